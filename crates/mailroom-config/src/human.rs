//! Human-readable quantities of the configuration: durations (`"30s"`, `"1h30m"`), byte sizes
//! (`"25MiB"`, `"10MB"`) and rates (`"1000/h"`). This is the one place where these strings are
//! parsed; every other module (and every CRD field) uses the types below, which serialise back
//! to their canonical string form and describe themselves in the JSON schema as `type: string`
//! with a `pattern`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a human string could not be parsed: names the value and the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}expected {forms}")]
pub struct HumanError {
    what: &'static str,
    value: String,
    reason: &'static str,
    forms: &'static str,
}

impl HumanError {
    fn new(what: &'static str, value: &str, forms: &'static str) -> Self {
        Self {
            what,
            value: value.to_owned(),
            reason: "",
            forms,
        }
    }

    fn overflow(mut self) -> Self {
        self.reason = "value too large; ";
        self
    }
}

const DURATION_FORMS: &str = "a whole number followed by a unit ms, s, m, h or d, \
                              optionally combined: \"500ms\", \"30s\", \"5m\", \"1h30m\", \"1d\"";
const SIZE_FORMS: &str = "a whole number of bytes, optionally followed by a unit kB/KB (1000), \
                          KiB (1024), MB, MiB, GB or GiB: \"1024\", \"10kB\", \"25MiB\"";
const RATE_FORMS: &str = "a count per unit or per duration: \"10/s\", \"5/m\", \"1000/h\", \
                          \"100/d\", \"20/30s\"";

const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";
const SIZE_PATTERN: &str = "^[0-9]+ ?(B|kB|KB|KiB|MB|MiB|GB|GiB)?$";
// The spelled-out units are those `Rate::from_str` accepts (in lowercase; the parser also takes
// other cases, which the schema, being stricter, rejects).
const RATE_PATTERN: &str =
    "^[0-9]+ ?/ ?(ms|s|m|h|d|sec|second|min|minute|hr|hour|day|([0-9]+(ms|s|m|h|d))+)$";

// ---------------------------------------------------------------------------------------------
// Durations

/// A duration written for humans: a whole number followed by a unit (`ms`, `s`, `m`, `h`, `d`),
/// optionally combined from largest to smallest unit, e.g. `"500ms"`, `"30s"`, `"5m"`,
/// `"1h30m"`, `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(Duration);

const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl HumanDuration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// A duration of `mins` minutes.
    pub const fn from_mins(mins: u64) -> Self {
        Self(Duration::from_secs(mins.saturating_mul(60)))
    }

    /// The duration as a [`Duration`].
    pub const fn as_duration(&self) -> Duration {
        self.0
    }

    /// True for a zero duration (`"0s"`).
    pub const fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

/// Parses `"1h30m"` into milliseconds. Units must not repeat and must go from large to small.
fn parse_millis(s: &str) -> Option<Option<u64>> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut overflow = false;
    let mut i = 0;
    let mut last_unit = usize::MAX; // index into DURATION_UNITS of the previous unit
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let number: u64 = match s[start..i].parse() {
            Ok(n) => n,
            Err(_) => {
                overflow = true;
                0
            }
        };
        let rest = &s[i..];
        let (index, (unit, factor)) = DURATION_UNITS
            .iter()
            .enumerate()
            .filter(|(_, (u, _))| rest.starts_with(u))
            // "ms" must win over "m": prefer the longest matching unit.
            .max_by_key(|(_, (u, _))| u.len())?;
        if last_unit != usize::MAX && index <= last_unit {
            return None;
        }
        last_unit = index;
        i += unit.len();
        match number
            .checked_mul(*factor)
            .and_then(|v| total.checked_add(v))
        {
            Some(t) => total = t,
            None => overflow = true,
        }
    }
    Some(if overflow { None } else { Some(total) })
}

impl FromStr for HumanDuration {
    type Err = HumanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || HumanError::new("duration", s, DURATION_FORMS);
        match parse_millis(s.trim()) {
            None => Err(error()),
            Some(None) => Err(error().overflow()),
            Some(Some(ms)) => Ok(Self::from_millis(ms)),
        }
    }
}

impl fmt::Display for HumanDuration {
    /// Canonical form: largest units first, e.g. `"1h30m"`, `"1s500ms"`, `"0s"`.
    /// Sub-millisecond parts are not representable in the string form and are dropped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, factor) in DURATION_UNITS {
            if ms >= factor {
                write!(f, "{}{unit}", ms / factor)?;
                ms %= factor;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Sizes

/// A size in bytes written for humans: a whole number of bytes, optionally followed by a decimal
/// unit (`kB` or `KB` = 1000, `MB`, `GB`) or a binary unit (`KiB` = 1024, `MiB`, `GiB`), e.g.
/// `"1024"`, `"10kB"`, `"25MiB"`. A plain YAML integer is read as a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(u64);

const SIZE_UNITS: [(&str, u64); 9] = [
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("kB", 1_000),
    ("KB", 1_000),
    ("B", 1),
    ("", 1),
];

impl ByteSize {
    /// A size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// A size of `kib` kibibytes (1024 bytes each).
    pub const fn kib(kib: u64) -> Self {
        Self(kib << 10)
    }

    /// A size of `mib` mebibytes (1024 KiB each).
    pub const fn mib(mib: u64) -> Self {
        Self(mib << 20)
    }

    /// A size of `gib` gibibytes (1024 MiB each).
    pub const fn gib(gib: u64) -> Self {
        Self(gib << 30)
    }

    /// The size in bytes.
    pub const fn bytes(&self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = HumanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || HumanError::new("size", s, SIZE_FORMS);
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(error());
        }
        let (number, unit) = t.split_at(digits);
        let unit = unit.strip_prefix(' ').unwrap_or(unit);
        let factor = SIZE_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, f)| *f)
            .ok_or_else(error)?;
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .map(Self)
            .ok_or_else(|| error().overflow())
    }
}

impl fmt::Display for ByteSize {
    /// Canonical form: the largest unit that divides the size exactly (binary units first), else
    /// plain bytes, e.g. `"25MiB"`, `"10MB"`, `"1234"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = SIZE_UNITS
            .iter()
            .filter(|(u, _)| !u.is_empty() && *u != "B" && *u != "KB")
            .find(|(_, factor)| self.0 != 0 && self.0.is_multiple_of(*factor));
        match unit {
            Some((u, factor)) => write!(f, "{}{u}", self.0 / factor),
            None => write!(f, "{}", self.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rates

/// A rate written for humans: a count per time unit (`s`, `m`, `h`, `d`) or per duration,
/// e.g. `"10/s"`, `"1000/h"`, `"100/d"`, `"20/30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u64,
    per: HumanDuration,
}

impl Rate {
    /// `count` events per `per`.
    pub const fn new(count: u64, per: Duration) -> Self {
        Self {
            count,
            per: HumanDuration(per),
        }
    }

    /// The number of events allowed in each period.
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// The length of the period.
    pub const fn per(&self) -> Duration {
        self.per.0
    }
}

impl FromStr for Rate {
    type Err = HumanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || HumanError::new("rate", s, RATE_FORMS);
        let (count, per) = s.trim().split_once('/').ok_or_else(error)?;
        let (count, per) = (count.trim(), per.trim());
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let count: u64 = count.parse().map_err(|_| error().overflow())?;
        // A bare unit means "one of that unit"; the spelled-out units of mail operators'
        // habits ("600/min", "200000/day") are accepted too.
        let per = if per.bytes().all(|b| b.is_ascii_alphabetic()) {
            let unit = match per.to_ascii_lowercase().as_str() {
                "sec" | "second" => "s".to_owned(),
                "min" | "minute" => "m".to_owned(),
                "hr" | "hour" => "h".to_owned(),
                "day" => "d".to_owned(),
                other => other.to_owned(),
            };
            format!("1{unit}")
        } else {
            per.to_owned()
        };
        let per = match parse_millis(&per) {
            None => return Err(error()),
            Some(None) => return Err(error().overflow()),
            Some(Some(ms)) => HumanDuration::from_millis(ms),
        };
        Ok(Self { count, per })
    }
}

impl fmt::Display for Rate {
    /// Canonical form: `"10/s"` when the period is one unit, else `"20/30s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = self.per.to_string();
        match per.strip_prefix('1') {
            Some(unit) if unit.bytes().all(|b| b.is_ascii_alphabetic()) => {
                write!(f, "{}/{unit}", self.count)
            }
            _ => write!(f, "{}/{per}", self.count),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// serde and schemars glue, shared by the three types

macro_rules! human_string_type {
    ($ty:ty, $name:literal, $pattern:expr, $description:expr, $expecting:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $description,
                })
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct HumanVisitor;

                impl Visitor<'_> for HumanVisitor {
                    type Value = $ty;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }

                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        <$ty>::from_integer(v).ok_or_else(|| {
                            E::invalid_type(de::Unexpected::Unsigned(v), &self)
                        })
                    }

                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        u64::try_from(v)
                            .ok()
                            .and_then(<$ty>::from_integer)
                            .ok_or_else(|| E::invalid_type(de::Unexpected::Signed(v), &self))
                    }
                }

                deserializer.deserialize_any(HumanVisitor)
            }
        }
    };
}

/// How a bare YAML integer is read, if at all.
trait FromInteger: Sized {
    fn from_integer(v: u64) -> Option<Self>;
}

impl FromInteger for HumanDuration {
    fn from_integer(_: u64) -> Option<Self> {
        None // a duration needs a unit: "30" could be seconds or milliseconds
    }
}

impl FromInteger for ByteSize {
    fn from_integer(v: u64) -> Option<Self> {
        Some(Self(v))
    }
}

impl FromInteger for Rate {
    fn from_integer(_: u64) -> Option<Self> {
        None
    }
}

human_string_type!(
    HumanDuration,
    "HumanDuration",
    DURATION_PATTERN,
    "A duration: whole number and unit (ms, s, m, h, d), combinable, e.g. \"30s\", \"5m\", \"1h30m\".",
    "a duration string such as \"500ms\", \"30s\", \"5m\" or \"1h30m\""
);
human_string_type!(
    ByteSize,
    "ByteSize",
    SIZE_PATTERN,
    "A size in bytes, optionally with a unit: kB/KB (1000), KiB (1024), MB, MiB, GB, GiB, e.g. \"25MiB\".",
    "a size such as 1024, \"10kB\" or \"25MiB\""
);
human_string_type!(
    Rate,
    "Rate",
    RATE_PATTERN,
    "A rate: count per unit (s, m, h, d) or per duration, e.g. \"10/s\", \"1000/h\", \"20/30s\".",
    "a rate string such as \"10/s\", \"1000/h\" or \"20/30s\""
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let cases: &[(&str, Option<u64>)] = &[
            ("500ms", Some(500)),
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("2h", Some(7_200_000)),
            ("1d", Some(86_400_000)),
            ("1h30m", Some(5_400_000)),
            ("1m30s500ms", Some(90_500)),
            ("0s", Some(0)),
            (" 10s ", Some(10_000)),
            ("", None),
            ("30", None),
            ("s", None),
            ("5x", None),
            ("1.5h", None),
            ("-1s", None),
            ("30m1h", None), // units must go from large to small
            ("1m1m", None),
            ("1 h", None),
            ("99999999999999999999s", None),
            ("18446744073709551615d", None),
        ];
        for (input, expected) in cases {
            let got = input
                .parse::<HumanDuration>()
                .ok()
                .map(|d| u64::try_from(d.as_duration().as_millis()).unwrap_or(u64::MAX));
            assert_eq!(got, *expected, "input {input:?}");
        }
    }

    #[test]
    fn durations_display_canonically_and_round_trip() {
        let cases = [
            (0, "0s"),
            (500, "500ms"),
            (1_500, "1s500ms"),
            (90_000, "1m30s"),
            (5_400_000, "1h30m"),
            (86_400_000, "1d"),
            (90_000_000, "1d1h"),
        ];
        for (ms, text) in cases {
            let d = HumanDuration::from_millis(ms);
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<HumanDuration>(), Ok(d));
        }
    }

    #[test]
    fn sizes_parse() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1024", Some(1024)),
            ("0", Some(0)),
            ("100B", Some(100)),
            ("10kB", Some(10_000)),
            ("10KB", Some(10_000)),
            ("10KiB", Some(10_240)),
            ("25MiB", Some(25 << 20)),
            ("25 MiB", Some(25 << 20)),
            ("3MB", Some(3_000_000)),
            ("2GB", Some(2_000_000_000)),
            ("2GiB", Some(2 << 30)),
            ("", None),
            ("MiB", None),
            ("10kiB", None),
            ("10mb", None),
            ("25XB", None),
            ("1.5MiB", None),
            ("-1", None),
            ("99999999999GiB", None),
        ];
        for (input, expected) in cases {
            let got = input.parse::<ByteSize>().ok().map(|s| s.bytes());
            assert_eq!(got, *expected, "input {input:?}");
        }
    }

    #[test]
    fn sizes_display_canonically_and_round_trip() {
        let cases = [
            (0, "0"),
            (1234, "1234"),
            (1000, "1kB"),
            (1024, "1KiB"),
            (25 << 20, "25MiB"),
            (10_000_000, "10MB"),
            (1 << 30, "1GiB"),
        ];
        for (bytes, text) in cases {
            let s = ByteSize::from_bytes(bytes);
            assert_eq!(s.to_string(), text);
            assert_eq!(text.parse::<ByteSize>(), Ok(s));
        }
    }

    #[test]
    fn rates_parse_and_display() {
        type Case = (&'static str, Option<(u64, u64)>, &'static str);
        let cases: &[Case] = &[
            ("1000/h", Some((1000, 3_600)), "1000/h"),
            ("10/s", Some((10, 1)), "10/s"),
            ("5/m", Some((5, 60)), "5/m"),
            ("100/d", Some((100, 86_400)), "100/d"),
            ("20/30s", Some((20, 30)), "20/30s"),
            ("10 / s", Some((10, 1)), "10/s"),
            ("1/1h", Some((1, 3_600)), "1/h"),
            ("600/min", Some((600, 60)), "600/m"),
            ("10000/hour", Some((10_000, 3_600)), "10000/h"),
            ("200000/day", Some((200_000, 86_400)), "200000/d"),
            ("3/sec", Some((3, 1)), "3/s"),
            ("10", None, ""),
            ("/s", None, ""),
            ("10/", None, ""),
            ("10/x", None, ""),
            ("ten/s", None, ""),
        ];
        for (input, expected, canonical) in cases {
            let got = input.parse::<Rate>();
            assert_eq!(
                got.as_ref().ok().map(|r| (r.count(), r.per().as_secs())),
                *expected,
                "input {input:?}"
            );
            if let Ok(rate) = got {
                assert_eq!(rate.to_string(), *canonical);
            }
        }
    }

    #[test]
    fn errors_name_the_value_and_the_forms() {
        let Err(e) = "25XB".parse::<ByteSize>() else {
            panic!("25XB parsed");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("invalid size \"25XB\": expected a whole number"),
            "{text}"
        );
        assert!(text.contains("25MiB"), "{text}");

        let Err(e) = "5x".parse::<HumanDuration>() else {
            panic!("5x parsed");
        };
        assert!(
            e.to_string()
                .starts_with("invalid duration \"5x\": expected"),
            "{e}"
        );

        let Err(e) = "99999999999999999999s".parse::<HumanDuration>() else {
            panic!("overflow parsed");
        };
        assert!(e.to_string().contains("value too large; expected"), "{e}");

        let Err(e) = "10".parse::<Rate>() else {
            panic!("10 parsed");
        };
        assert!(
            e.to_string().starts_with("invalid rate \"10\": expected"),
            "{e}"
        );
    }

    #[test]
    fn patterns_agree_with_parsers() {
        // A tiny check that the schema patterns are anchored and mention every unit.
        for unit in ["ms", "s", "m", "h", "d"] {
            assert!(DURATION_PATTERN.contains(unit));
            assert!(RATE_PATTERN.contains(unit));
        }
        for (unit, _) in SIZE_UNITS.iter().filter(|(u, _)| !u.is_empty()) {
            assert!(SIZE_PATTERN.contains(unit), "{unit}");
        }
    }

    #[test]
    fn rate_pattern_accepts_what_the_parser_accepts() {
        // The CRD rejects what the pattern rejects, so a documented form must match it.
        let pattern = regex::Regex::new(RATE_PATTERN).unwrap();
        let good = [
            "1000/h",
            "10/s",
            "5/m",
            "100/d",
            "20/30s",
            "10 / s",
            "1/1h",
            "600/min",
            "10000/hour",
            "200000/day",
            "3/sec",
            "5/1h30m",
        ];
        for input in good {
            assert!(input.parse::<Rate>().is_ok(), "{input}");
            assert!(
                pattern.is_match(input),
                "{input} parses but fails the pattern"
            );
        }
        for input in ["10", "/s", "10/", "10/x", "ten/s", "10/minutes"] {
            assert!(!pattern.is_match(input), "{input}");
        }
    }
}
