{{/*
Names, labels and the pieces of the STS configuration that follow from the pod's layout.

Paths inside the container (the image's Dockerfile creates /etc/sts and /var/lib/sts):
  /etc/sts/config.yaml, /etc/sts/policies/   ConfigMap (read-only)
  /var/lib/sts/                              state: SQLite, audit log, generated development keys
  /run/sts/keys/                             provisioned signing keys (read-only; see signingKeys)
  dir of spiffe.socketPath                   the SPIFFE CSI volume with the Workload API socket
*/}}

{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "sts.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "sts.fullname" -}}
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
{{- define "sts.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "sts.labels" -}}
helm.sh/chart: {{ include "sts.chart" . }}
{{ include "sts.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the STS pods (Deployment, Service, PDB, NetworkPolicy, ClusterSPIFFEID). */}}
{{- define "sts.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sts.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The service account the pods run as. */}}
{{- define "sts.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sts.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "sts.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* "true" when a Redis store is configured (URL in the config or in a Secret, or Sentinels), else empty. */}}
{{- define "sts.redis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.sentinels }}true{{ end }}
{{- end }}

{{/* store.redis of the config: only what differs from the STS's defaults, so nothing is written without Redis. */}}
{{- define "sts.storeRedis" -}}
{{- $redis := dict }}
{{- if .Values.redis.sentinels }}
{{- $_ := set $redis "sentinels" .Values.redis.sentinels }}
{{- $_ = set $redis "master_name" .Values.redis.masterName }}
{{- end }}
{{- if .Values.redis.username }}
{{- $_ := set $redis "username" .Values.redis.username }}
{{- end }}
{{- if .Values.redis.passwordSecret }}
{{- $_ := set $redis "password_file" "/run/sts/redis/password" }}
{{- if .Values.redis.sentinelPasswordSecretKey }}
{{- $_ = set $redis "sentinel_password_file" "/run/sts/redis/sentinel-password" }}
{{- end }}
{{- end }}
{{- if .Values.redis.caSecret }}
{{- $_ := set $redis "tls_ca_file" "/run/sts/redis-ca/ca.pem" }}
{{- end }}
{{- if not .Values.redis.requireDurability }}
{{- $_ := set $redis "require_durability" false }}
{{- end }}
{{- if ne (int .Values.redis.waitTimeout) 2 }}
{{- $_ := set $redis "wait_timeout" (int .Values.redis.waitTimeout) }}
{{- end }}
{{- toJson $redis }}
{{- end }}

{{/* The most pods that may run at once: maxReplicas with the autoscaler, else replicaCount. */}}
{{- define "sts.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/* "true" when the STS serves TLS itself (config.listen.tls), else empty. */}}
{{- define "sts.tls" -}}
{{- if .Values.config.listen.tls }}true{{ end }}
{{- end }}

{{/* Name of the container and Service port: what it speaks, so meshes and controllers read it right. */}}
{{- define "sts.portName" -}}
{{- if include "sts.tls" . }}https{{ else }}http{{ end }}
{{- end }}

{{/* The Service's URL in the cluster, e.g. http://sts.sts-system.svc:8443 (no port when it is the scheme's). */}}
{{- define "sts.serviceUrl" -}}
{{- $scheme := include "sts.portName" . }}
{{- $port := int .Values.service.port }}
{{- $host := printf "%s.%s.svc" (include "sts.fullname" .) .Release.Namespace }}
{{- if or (and (eq $scheme "https") (eq $port 443)) (and (eq $scheme "http") (eq $port 80)) }}
{{- printf "%s://%s" $scheme $host }}
{{- else }}
{{- printf "%s://%s:%d" $scheme $host $port }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the signing keys, empty when the pods generate development keys. */}}
{{- define "sts.signingKeysSecret" -}}
{{- if .Values.signingKeys.existingSecret }}
{{- .Values.signingKeys.existingSecret }}
{{- else if .Values.signingKeys.files }}
{{- printf "%s-signing-keys" (include "sts.fullname" .) }}
{{- end }}
{{- end }}

{{/* keys.dir: the read-only copy of the Secret, or the state volume where development keys are generated. */}}
{{- define "sts.keysDir" -}}
{{- if include "sts.signingKeysSecret" . }}/run/sts/keys{{ else }}/var/lib/sts/keys{{ end }}
{{- end }}

{{/* Trust domains the STS reads from the Workload API other than its own: the agent serves their bundles
     only to an entry that federates with them. A JSON list. */}}
{{- define "sts.federatesWith" -}}
{{- $out := list }}
{{- range $trustDomain, $source := .Values.config.trust_domains }}
{{- if and (ne $trustDomain $.Values.spiffe.trustDomain) (kindIs "map" $source) (eq (toString (get $source "bundle")) "workload-api") }}
{{- $out = append $out $trustDomain }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The STS configuration file: .Values.config plus the keys the pod's layout decides. */}}
{{- define "sts.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if and $config.listen.tls (not $config.listen.tls.public_url) }}
{{- $_ := set $config.listen.tls "public_url" (include "sts.serviceUrl" .) }}
{{- end }}
{{- $workloadApi := deepCopy (default (dict) $config.workload_api) }}
{{- $_ := set $workloadApi "socket" (printf "unix://%s" .Values.spiffe.socketPath) }}
{{- $_ = set $config "workload_api" $workloadApi }}
{{- $keys := deepCopy (default (dict) $config.keys) }}
{{- $_ = set $keys "dir" (include "sts.keysDir" .) }}
{{- $_ = set $config "keys" $keys }}
{{- $_ = set $config "policy" (dict "dir" "/etc/sts/policies") }}
{{- $_ = set $config "audit" (dict "path" (ternary "-" "/var/lib/sts/audit.jsonl" .Values.audit.stdout)) }}
{{- $store := dict }}
{{- if .Values.redis.url }}
{{- $_ = set $store "url" .Values.redis.url }}
{{- else if and .Values.redis.sentinels .Values.redis.tls }}
{{- $_ = set $store "url" (printf "rediss+sentinel:///%s/0" .Values.redis.masterName) }}
{{- else if not (or .Values.redis.existingSecret .Values.redis.sentinels) }}
{{- $_ = set $store "url" "sqlite:///var/lib/sts/sts.db" }}
{{- end }}
{{- $storeRedis := include "sts.storeRedis" . | fromJson }}
{{- if $storeRedis }}
{{- $_ = set $store "redis" $storeRedis }}
{{- end }}
{{- if $store }}
{{- $_ = set $config "store" $store }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Combinations the schema cannot express, and the schema's own rules for `--skip-schema-validation`. */}}
{{- define "sts.validate" -}}
{{- $issuer := required "config.issuer is required: the https URL of this STS (e.g. https://sts.example.org); JWT-SVIDs must carry it as audience" .Values.config.issuer }}
{{- if not (hasPrefix "https://" $issuer) }}
{{- fail (printf "config.issuer %q must be an https URL (TLS terminates in front of the STS)" $issuer) }}
{{- end }}
{{- $replicas := int (include "sts.maxReplicas" .) }}
{{- if and (gt $replicas 1) (not (include "sts.redis" .)) }}
{{- fail (printf "%d replicas need Redis (redis.url, redis.existingSecret or redis.sentinels): the SQLite store is one file on one pod" $replicas) }}
{{- end }}
{{- if and (gt $replicas 1) (not (include "sts.signingKeysSecret" .)) }}
{{- fail (printf "%d replicas need provisioned signing keys (signingKeys.existingSecret or signingKeys.files): each pod would otherwise sign with its own generated key" $replicas) }}
{{- end }}
{{- if and (gt $replicas 1) .Values.persistence.enabled }}
{{- fail "persistence (one PersistentVolumeClaim for /var/lib/sts) is for a single replica; with Redis, use audit.stdout: true and leave persistence off" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is greater than autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- if and .Values.redis.sentinels (or .Values.redis.url .Values.redis.existingSecret) }}
{{- fail "set redis.sentinels or a URL (redis.url, redis.existingSecret), not both: the Sentinels are named once" }}
{{- end }}
{{- if and .Values.redis.tls (not .Values.redis.sentinels) }}
{{- fail "redis.tls applies to redis.sentinels; with redis.url, write rediss:// or rediss+sentinel:// there" }}
{{- end }}
{{- if and (not (include "sts.signingKeysSecret" .)) (not .Values.config.keys.generate) }}
{{- fail "no signing keys: set signingKeys.existingSecret or signingKeys.files (sts keys create), or config.keys.generate: true to try the chart with development keys" }}
{{- end }}
{{- if and .Values.signingKeys.existingSecret .Values.signingKeys.files }}
{{- fail "set signingKeys.existingSecret or signingKeys.files, not both" }}
{{- end }}
{{- if not (hasKey .Values.config.trust_domains .Values.spiffe.trustDomain) }}
{{- fail (printf "config.trust_domains has no entry for spiffe.trustDomain %q (this cluster's trust domain)" .Values.spiffe.trustDomain) }}
{{- end }}
{{- end }}
