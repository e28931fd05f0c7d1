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

{{- define "linewatch.redisSecret" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "linewatch.fullname" .)) -}}
{{- end -}}

{{/* environment shared by every linewatch container (overrides linewatch.yaml) */}}
{{- define "linewatch.env" -}}
- name: LINEWATCH_BOOTSTRAP_SERVERS
  value: {{ required "kafka.bootstrapServers is required" .Values.kafka.bootstrapServers | quote }}
{{- if or .Values.redis.url .Values.redis.existingSecret }}
- name: LINEWATCH_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "linewatch.redisSecret" . }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}
- name: LINEWATCH_TOPIC_PREFIX
  value: {{ .Values.topicPrefix | quote }}
- name: LINEWATCH_PARTITIONS
  value: {{ .Values.partitions | quote }}
- name: LINEWATCH_KAFKA__SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: LINEWATCH_KAFKA__REPLICATION_FACTOR
  value: {{ .Values.kafka.replicationFactor | quote }}
{{- with .Values.kafka.minInsyncReplicas }}
- name: LINEWATCH_KAFKA__MIN_INSYNC_REPLICAS
  value: {{ . | quote }}
{{- end }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- name: LINEWATCH_KAFKA__SASL_MECHANISM
  value: {{ required "kafka.sasl.mechanism is required for SASL" .Values.kafka.sasl.mechanism | quote }}
- name: LINEWATCH_KAFKA__SASL_USERNAME
  value: {{ required "kafka.sasl.username is required for SASL" .Values.kafka.sasl.username | quote }}
- name: LINEWATCH_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret (the password) is required for SASL" .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
- name: LINEWATCH_KAFKA__SSL_CAFILE
  value: /etc/linewatch/kafka-tls/ca.crt
{{- if .Values.kafka.tls.clientCertificate }}
- name: LINEWATCH_KAFKA__SSL_CERTFILE
  value: /etc/linewatch/kafka-tls/tls.crt
- name: LINEWATCH_KAFKA__SSL_KEYFILE
  value: /etc/linewatch/kafka-tls/tls.key
{{- end }}
{{- end }}
- name: LINEWATCH_OPS__HOST
  value: "0.0.0.0"                 # the kubelet and Prometheus reach the pod's IP
- name: LINEWATCH_OPS__PORT
  value: {{ .Values.metrics.port | quote }}
- name: LINEWATCH_OPS__LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: LINEWATCH_OPS__HEARTBEAT_S
  value: {{ .Values.heartbeatSeconds | quote }}
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

{{/* pod annotations: config checksum, and where Prometheus scrapes */}}
{{- define "linewatch.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* container-level pieces shared by every linewatch container: security, port, probes */}}
{{- define "linewatch.containerCommon" -}}
securityContext:
{{ toYaml .Values.securityContext | indent 2 }}
ports:
  - name: metrics
    containerPort: {{ .Values.metrics.port }}
    protocol: TCP
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
{{ toYaml .Values.probes.liveness | indent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
{{ toYaml .Values.probes.readiness | indent 2 }}
{{- end -}}

{{/* writable scratch for a read-only root: /tmp and ~/.cache (anchors, downloaded weights) */}}
{{- define "linewatch.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/linewatch/.cache
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: /etc/linewatch/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "linewatch.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- with .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{- define "linewatch.configArgs" -}}
- --config
- /etc/linewatch/linewatch.yaml
{{- end -}}
