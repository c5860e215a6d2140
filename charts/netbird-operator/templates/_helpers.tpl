{{- define "nbop.name" -}}netbird-operator{{- end -}}
{{- define "nbop.fullname" -}}
{{- if contains "netbird-operator" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-netbird-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "nbop.selectorLabels" -}}
app.kubernetes.io/name: netbird-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "nbop.labels" -}}
{{ include "nbop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
{{- define "nbop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "nbop.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{/* The watched namespaces, comma-separated: watchNamespaces and watchNamespace together, each once, sorted. Empty: all. */}}
{{- define "nbop.watchNamespaces" -}}
{{- $nss := concat (.Values.watchNamespaces | default list) (ternary (list .Values.watchNamespace) list (ne .Values.watchNamespace "")) -}}
{{- $nss | uniq | sortAlpha | join "," -}}
{{- end -}}
