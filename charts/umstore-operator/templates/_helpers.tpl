{{- define "umstore-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "umstore-operator.labels" -}}
app.kubernetes.io/name: umstore-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "umstore-operator.selector" -}}
app.kubernetes.io/name: umstore-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "umstore-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "umstore-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* Labels of a monitoring object: the chart's and monitoring.labels. */ -}}
{{- define "umstore-operator.monitoringLabels" -}}
{{ include "umstore-operator.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- /* The namespaces stores live in: watchNamespace, else any. */ -}}
{{- define "umstore-operator.storeNamespaces" -}}
{{- if .Values.watchNamespace -}}
matchNames:
  - {{ .Values.watchNamespace }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{- /* Relabelings giving every sample of a store's pods its `store` label. */ -}}
{{- define "umstore-operator.storeRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
  targetLabel: store
  action: replace
{{- end -}}
