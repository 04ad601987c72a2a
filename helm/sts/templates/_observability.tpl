{{/*
Whether to render the Prometheus Operator objects: the value when it is true or false, else whether the
cluster serves the CRD (helm template: --api-versions monitoring.coreos.com/v1/ServiceMonitor).
*/}}
{{- define "sts.serviceMonitorEnabled" -}}
{{- $v := .Values.serviceMonitor.enabled -}}
{{- if kindIs "bool" $v }}{{ if $v }}true{{ end }}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" }}true{{ end -}}
{{- end }}

{{- define "sts.prometheusRuleEnabled" -}}
{{- $v := .Values.prometheusRule.enabled -}}
{{- if kindIs "bool" $v }}{{ if $v }}true{{ end }}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule" }}true{{ end -}}
{{- end }}
