{{/* Chart name, overridable with nameOverride. */}}
{{- define "mailroom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource name. fullnameOverride, else the release name when it
contains the chart name, else <release>-<chart>; at most 63 characters (a DNS label).
*/}}
{{- define "mailroom.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart label: name-version. */}}
{{- define "mailroom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "mailroom.labels" -}}
helm.sh/chart: {{ include "mailroom.chart" . }}
{{ include "mailroom.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailroom
{{- end }}

{{/* Labels that select the operator pods (stable across upgrades). */}}
{{- define "mailroom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailroom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "mailroom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailroom.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository:tag, tag defaulting to the appVersion. */}}
{{- define "mailroom.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The mail pods' image: mailImage, each empty field taken from image. */}}
{{- define "mailroom.mailImage" -}}
{{- $repository := .Values.mailImage.repository | default .Values.image.repository }}
{{- $tag := .Values.mailImage.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* "true" when leader election is on: forced, or more than one replica. */}}
{{- define "mailroom.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* nats.url without blanks: "nats://a:4222, nats://b:4222" -> "nats://a:4222,nats://b:4222". */}}
{{- define "mailroom.natsUrls" -}}
{{- $urls := list }}
{{- range splitList "," .Values.nats.url }}
{{- if trim . }}{{ $urls = append $urls (trim .) }}{{ end }}
{{- end }}
{{- required "nats.url must name at least one NATS server" (join "," $urls) }}
{{- end }}

{{/*
The queue.jetstream file of MAILROOM_QUEUE_CONFIG: nats.queueConfig, with `urls` from nats.url
when it does not set them. Empty when nats.queueConfig is empty.
*/}}
{{- define "mailroom.queueConfig" -}}
{{- if .Values.nats.queueConfig }}
{{- $config := deepCopy .Values.nats.queueConfig }}
{{- if not (hasKey $config "urls") }}
{{- $_ := set $config "urls" (include "mailroom.natsUrls" . | splitList ",") }}
{{- end }}
{{- toYaml $config }}
{{- end }}
{{- end }}

{{/* The rules of the operator's (Cluster)Role for the watched namespaces. */}}
{{- define "mailroom.rules" -}}
- apiGroups: [mailroom.dev]
  resources: [maillisteners, deliverypolicies]
  verbs: [get, list, watch, patch, update]
- apiGroups: [mailroom.dev]
  resources: [maillisteners/status, deliverypolicies/status]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
