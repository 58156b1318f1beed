{{- define "citystream.name" -}}
{{- printf "%s-citystream" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "citystream.labels" -}}
app.kubernetes.io/name: citystream
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "citystream.selector" -}}
app.kubernetes.io/name: citystream
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "citystream.controlSelector" -}}
app.kubernetes.io/name: citystream
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control
{{- end -}}

{{- define "citystream.secret" -}}
{{- .Values.secrets.existingSecret | default (include "citystream.name" .) -}}
{{- end -}}
