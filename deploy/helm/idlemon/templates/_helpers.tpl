{{/* The release's name for its objects: the release name when it contains "idlemon". */}}
{{- define "idlemon.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "idlemon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What selects the pods: fixed for the life of a release. */}}
{{- define "idlemon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idlemon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "idlemon.labels" -}}
{{ include "idlemon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "idlemon.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "idlemon.configPath" -}}/etc/idlemon/idlemon.toml{{- end -}}

{{/* A number as idlemon parses it: integers without an exponent
     (YAML numbers reach templates as float64: 1000000 would print as 1e+06). */}}
{{- define "idlemon.number" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* idlemon's config file: idlemon.paths, then the [enforce] table when
     idlemon.enforce.mode is not off. Empty: no ConfigMap, no file. */}}
{{- define "idlemon.configToml" -}}
{{- $enforce := .Values.idlemon.enforce -}}
{{- with .Values.idlemon.paths }}{{ . | trimSuffix "\n" }}
{{ end -}}
{{- if and $enforce (ne (toString $enforce.mode) "off") }}
[enforce]
mode = {{ $enforce.mode | quote }}
{{- with $enforce.cgroups }}
cgroups = [{{ range $index, $cgroup := . }}{{ if $index }}, {{ end }}{{ $cgroup | quote }}{{ end }}]
{{- end }}
{{- if not (kindIs "invalid" $enforce.idlePercent) }}
idle_percent = {{ include "idlemon.number" $enforce.idlePercent }}
{{- end }}
{{- if not (kindIs "invalid" $enforce.interval) }}
interval = {{ include "idlemon.number" $enforce.interval }}
{{- end }}
{{- if not (kindIs "invalid" $enforce.count) }}
count = {{ include "idlemon.number" $enforce.count }}
{{- end }}
{{- if not (kindIs "invalid" $enforce.accepted) }}
accepted = {{ $enforce.accepted }}
{{- end }}
{{- with $enforce.namespaces }}
namespaces = [{{ range $index, $namespace := . }}{{ if $index }}, {{ end }}{{ $namespace | quote }}{{ end }}]
{{- end }}
{{- with $enforce.podLabels }}
{{- $labels := list }}
{{- range $key, $value := . }}
{{- $labels = append $labels (printf "%s = %s" ($key | quote) ($value | toString | quote)) }}
{{- end }}
pod_labels = { {{ join ", " $labels }} }
{{- end }}
{{- if not (kindIs "invalid" $enforce.override) }}
override = {{ $enforce.override }}
{{- end }}
{{ end -}}
{{- end -}}
