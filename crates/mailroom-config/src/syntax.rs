//! Syntax checks of the names and patterns a configuration contains: domain names, listener
//! names and the glob patterns of the `access` plugin. They only say whether a string is well
//! formed and why not; matching belongs to the crates that use the values.

/// Checks a domain name written as ASCII (A-labels for internationalised names): labels of
/// letters, digits and `-` (not at either end), 1 to 63 bytes each, 253 bytes in all. With
/// `wildcard`, a leading `*.` is allowed.
pub fn check_domain(name: &str, wildcard: bool) -> Result<(), String> {
    let bare = match name.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        Some(_) => {
            return Err(format!(
                "invalid domain {name:?}: a wildcard is not allowed here"
            ));
        }
        None => name,
    };
    let problem = if bare.is_empty() {
        Some("empty name".to_owned())
    } else if bare.len() > 253 {
        Some("longer than 253 characters".to_owned())
    } else if !bare.is_ascii() {
        Some("write internationalised names as A-labels (xn--...)".to_owned())
    } else {
        bare.split('.').find_map(|label| check_label(label).err())
    };
    match problem {
        None => Ok(()),
        Some(why) if wildcard => Err(format!(
            "invalid domain {name:?}: {why}; expected a name like \"example.com\" or \"*.example.com\""
        )),
        Some(why) => Err(format!(
            "invalid domain {name:?}: {why}; expected a name like \"mail.example.com\""
        )),
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label".to_owned());
    }
    if label.len() > 63 {
        return Err(format!("label {label:?} is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!("character {c:?} is not allowed"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// Checks a listener name: lowercase letters, digits and `-`, 1 to 63 characters, starting
/// and ending with a letter or digit (a DNS label, so it can name Kubernetes objects).
pub fn check_listener_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing: set a name (lowercase letters, digits or '-')".to_owned());
    }
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: expected 1 to 63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks a HELO pattern: a non-empty glob without whitespace or control characters, e.g.
/// `*.dynamic.example.net` or `[192.0.2.*]`.
pub fn check_helo_pattern(pattern: &str) -> Result<(), String> {
    check_glob(
        pattern,
        "HELO pattern",
        "\"*.dynamic.example.net\", \"[192.0.2.*]\"",
    )
}

/// Checks an address pattern: `user@example.com`, `@example.com`, `*@*.example.com`,
/// `postmaster@*`, or a glob without `@` matched against the whole address. The domain part
/// may hold letters, digits, `-`, `.`, `*` or an address literal in brackets.
pub fn check_address_pattern(pattern: &str) -> Result<(), String> {
    const FORMS: &str = "\"user@example.com\", \"@example.com\", \"*@*.example.com\"";
    check_glob(pattern, "address pattern", FORMS)?;
    let Some((local, domain)) = pattern.rsplit_once('@') else {
        return Ok(());
    };
    let invalid = |why: &str| {
        Err(format!(
            "invalid address pattern {pattern:?}: {why}; expected {FORMS}"
        ))
    };
    if local.contains('@') {
        return invalid("more than one '@'");
    }
    if domain.is_empty() {
        return invalid("nothing after '@' (use '*' for any domain)");
    }
    let literal = domain.starts_with('[') && domain.ends_with(']');
    let domain_ok = literal
        || domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*' | '_'))
            && !domain.contains("..");
    if domain_ok {
        Ok(())
    } else {
        invalid(
            "the domain part may only hold letters, digits, '-', '.', '*' or an [address literal]",
        )
    }
}

fn check_glob(pattern: &str, what: &str, forms: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err(format!("empty {what}: expected a glob such as {forms}"));
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid {what} {pattern:?}: whitespace or control characters; expected a glob such as {forms}"
        ));
    }
    Ok(())
}

/// An `http://host:port[/path]` URL of a plugin's service (plain HTTP: the service runs beside
/// the server, in the pod or on loopback). The port may be left out (80).
pub fn check_http_url(url: &str) -> Result<(), String> {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return Err(format!(
            "{url:?}: expected an http:// or https:// URL such as http://127.0.0.1:11333"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("{url:?}: no host"));
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(format!(
            "{url:?}: port {port:?} is not a number from 1 to 65535"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        let cases = [
            ("example.com", false, true),
            ("mail.example.test", false, true),
            ("localhost", false, true),
            ("MAIL.Example.COM", false, true),
            ("xn--bcher-kva.example", false, true),
            ("*.example.com", true, true),
            ("*.example.com", false, false),
            ("*", true, false),
            ("a.*.example.com", true, false),
            ("", false, false),
            ("example..com", false, false),
            ("example.com.", false, false),
            ("-bad.example", false, false),
            ("bad-.example", false, false),
            ("under_score.example", false, false),
            ("bücher.example", false, false),
            ("spa ce.example", false, false),
        ];
        for (name, wildcard, ok) in cases {
            assert_eq!(
                check_domain(name, wildcard).is_ok(),
                ok,
                "{name:?} wildcard={wildcard}"
            );
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(check_domain(&long, false).is_err());
    }

    #[test]
    fn listener_names() {
        for ok in ["smtp", "mx-1", "a", "submission587"] {
            assert!(check_listener_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "SMTP",
            "-smtp",
            "smtp-",
            "smtp_1",
            "smtp.1",
            long.as_str(),
        ] {
            assert!(check_listener_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn address_patterns() {
        let cases = [
            ("user@example.com", true),
            ("@example.com", true),
            ("*@*.example.com", true),
            ("postmaster@*", true),
            ("*spam*", true),
            ("user@[192.0.2.1]", true),
            ("", false),
            ("user @example.com", false),
            ("user@", false),
            ("a@b@example.com", false),
            ("user@exa mple.com", false),
            ("user@example..com", false),
            ("user@exa$mple.com", false),
        ];
        for (pattern, ok) in cases {
            assert_eq!(check_address_pattern(pattern).is_ok(), ok, "{pattern:?}");
        }
    }

    #[test]
    fn helo_patterns() {
        assert!(check_helo_pattern("*.dynamic.example.net").is_ok());
        assert!(check_helo_pattern("[192.0.2.*]").is_ok());
        assert!(check_helo_pattern("").is_err());
        assert!(check_helo_pattern("a b").is_err());
    }

    #[test]
    fn http_urls() {
        for ok in [
            "http://127.0.0.1:11333",
            "http://rspamd",
            "http://[::1]:11333/",
            "http://h:80/x",
            "https://policy.example:8443/check",
        ] {
            assert_eq!(check_http_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://h",
            "https://",
            "127.0.0.1:11333",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://u@h",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
    }
}
