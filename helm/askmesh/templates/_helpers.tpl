{{/* Names, labels and the facts about each tier the templates share. */}}

{{- define "askmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "askmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "askmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "askmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "askmesh.selector" -}}
app.kubernetes.io/name: {{ include "askmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "askmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "askmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The tiers, in start-up order, with their fixed ports and health service names: these are
askmesh/tiers.py's (tests/test_helm.py checks they agree) and the Envoy config in files/ is
rendered for them, so they are not values. The web tier serves HTTP: its health is a path. */}}
{{- define "askmesh.tiers" -}}
embedder: {port: 50061, health: askmesh.v1.Embedder, calls: []}
retriever: {port: 50062, health: askmesh.v1.Retriever, calls: []}
generator: {port: 50063, health: askmesh.v1.Generator, calls: []}
ingestor: {port: 50065, health: askmesh.v1.KnowledgeBases, calls: [embedder, retriever, generator]}
gateway: {port: 50064, health: askmesh.v1.Gateway, calls: [embedder, retriever, generator, ingestor]}
web: {port: 50066, health: /healthz, calls: [gateway, ingestor], http: true}
{{- end -}}

{{- define "askmesh.tierNames" -}}
[embedder, retriever, generator, ingestor, gateway, web]
{{- end -}}

{{- define "askmesh.image" -}}
{{- $tag := .tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{/* Envoy's front door and internal listener, and where every tier reaches the others. */}}
{{- define "askmesh.internalAddress" -}}
{{- printf "%s-envoy-internal:50052" (include "askmesh.fullname" .) -}}
{{- end -}}

{{/* The runtime layer that sets each tier's canary weight (passed to Envoy with --config-yaml);
the same as askmesh.envoy_k8s.runtime_layer. */}}
{{- define "askmesh.envoyRuntime" -}}
{{- $weights := dict -}}
{{- range $tier := include "askmesh.tierNames" . | fromYamlArray -}}
{{- $canary := (index $.Values $tier).canary -}}
{{- $weight := int $canary.weight -}}
{{- if or (lt $weight 0) (gt $weight 100) -}}
{{- fail (printf "%s.canary.weight: %d is not within 0-100" $tier $weight) -}}
{{- end -}}
{{- if and (gt $weight 0) (not $canary.enabled) -}}
{{- fail (printf "%s.canary.weight is %d but %s.canary.enabled is false: there would be no pods to send it to" $tier $weight $tier) -}}
{{- end -}}
{{- $_ := set $weights (printf "askmesh.weights.%s" $tier) (sub 100 $weight) -}}
{{- $_ := set $weights (printf "askmesh.weights.%s-canary" $tier) $weight -}}
{{- end -}}
{{- dict "layered_runtime" (dict "layers" (list (dict "name" "canary-weights" "static_layer" $weights) (dict "name" "admin" "admin_layer" (dict)))) | toJson -}}
{{- end -}}
