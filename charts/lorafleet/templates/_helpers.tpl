{{/* Names, labels and small lookups shared by the templates. */}}

{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped prefix of every resource name; kept to 52 characters so suffixes fit in 63. */}}
{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" . }}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector of the operator pods; also what the NetworkPolicy lets reach the trainers. */}}
{{- define "lorafleet.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector of the gateway pods; the NetworkPolicy lets them reach the trainers too. */}}
{{- define "lorafleet.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "lorafleet.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{- define "lorafleet.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lorafleet.authSecretName" -}}
{{- default (printf "%s-trainer-auth" (include "lorafleet.fullname" .)) .Values.trainerAuth.existingSecret }}
{{- end }}

{{- define "lorafleet.trainerPoolName" -}}
{{- default (printf "%s-trainers" (include "lorafleet.fullname" .)) .Values.trainerPool.name | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The claim of the release's pool: an existing one, else the one the chart creates. */}}
{{- define "lorafleet.trainerPoolClaimName" -}}
{{- default (printf "%s-adapters" (include "lorafleet.trainerPoolName" .)) .Values.trainerPool.storage.existingClaim }}
{{- end }}

{{/* Namespaces the operator manages: the release namespace first, then rbac.namespaces, deduplicated. */}}
{{- define "lorafleet.watchedNamespaces" -}}
{{- $all := prepend .Values.rbac.namespaces .Release.Namespace | uniq }}
{{- join "," $all }}
{{- end }}

{{/* True when the Prometheus Operator's API is served, or when the user forces its objects. */}}
{{- define "lorafleet.hasPrometheusOperator" -}}
{{- if or .Values.prometheus.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{- define "lorafleet.trainerImage" -}}
{{- default (printf "ghcr.io/lorafleet/trainer:%s" .Chart.AppVersion) .Values.operator.trainerImage }}
{{- end }}

{{/*
Rules on the namespaced objects the operator manages: one list, used by the per-namespace Roles and
by the ClusterRole of the cluster scope, so both scopes grant exactly the same verbs. Each verb is
used by lorafleet_operator/kube.py (the one module that calls the API) or by kopf itself:
  trainerpools        get: kube.get_pool; list, watch: kopf's watch; patch: kopf's finalizer and progress annotations
  loraadapters        get: kube.get_adapter; list: kube.list_pool_adapters and kopf; watch, patch: kopf
  (pools|adapters)/status  patch: kube.patch_pool_status, kube.patch_adapter_status
  pods                get: kube.get_pod; list: kube.list_pool_pods, kube.list_pods (a pool's inference servers); watch: kopf; create: kube.create_pod; delete: kube.delete_pod
  services            create: kube.create_service (the pool's headless Service)
  events (both APIs)  create: kopf's Events on pools and adapters
*/}}
{{- define "lorafleet.managedRules" -}}
- apiGroups: [lorafleet.io]
  resources: [trainerpools, loraadapters]
  verbs: [get, list, watch, patch]
- apiGroups: [lorafleet.io]
  resources: [trainerpools/status, loraadapters/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end }}
