{{- define "gpufleet.labels" -}}
app.kubernetes.io/part-of: gpufleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "gpufleet.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "gpufleet.storeSecret" -}}
{{ default (printf "%s-store" .Release.Name) .Values.store.existingSecret }}
{{- end -}}

{{- define "gpufleet.redisSecret" -}}
{{ default (printf "%s-redis" .Release.Name) .Values.redis.existingSecret }}
{{- end -}}

{{- define "gpufleet.env" -}}
- name: GPUFLEET_ENGINE_PORT
  value: {{ .Values.engine.port | quote }}
- name: GPUFLEET_STORE
  valueFrom:
    secretKeyRef:
      name: {{ include "gpufleet.storeSecret" . }}
      key: {{ .Values.store.secretKey }}
{{- if or .Values.redis.existingSecret .Values.redis.url }}
- name: GPUFLEET_REDIS
  valueFrom:
    secretKeyRef:
      name: {{ include "gpufleet.redisSecret" . }}
      key: {{ .Values.redis.secretKey }}
{{- end }}
{{- end -}}

{{- define "gpufleet.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gpufleet.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}
