{{/* Names and shared pieces of the linewatch chart. */}}
{{- define "linewatch.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "linewatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "linewatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "linewatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels; call with (dict "root" $ "component" "worker") */}}
{{- define "linewatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "linewatch.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "linewatch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* environment shared by every linewatch container (overrides linewatch.yaml) */}}
{{- define "linewatch.env" -}}
- name: LINEWATCH_BOOTSTRAP_SERVERS
  value: {{ required "kafka.bootstrapServers is required" .Values.kafka.bootstrapServers | quote }}
{{- with .Values.redisUrl }}
- name: LINEWATCH_REDIS_URL
  value: {{ . | quote }}
{{- end }}
- name: LINEWATCH_TOPIC_PREFIX
  value: {{ .Values.topicPrefix | quote }}
- name: LINEWATCH_PARTITIONS
  value: {{ .Values.partitions | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* pod-level pieces shared by every Deployment */}}
{{- define "linewatch.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
securityContext:
{{ toYaml .Values.podSecurityContext | indent 2 }}
{{- end -}}

{{- define "linewatch.configArgs" -}}
- --config
- /etc/linewatch/linewatch.yaml
{{- end -}}
