{{/* One tier's pod template. Arguments: root (the chart's context), tier (its name), track
(stable or canary). */}}
{{- define "askmesh.tierPod" -}}
{{- $root := .root -}}
{{- $tier := .tier -}}
{{- $v := index $root.Values $tier -}}
{{- $spec := index (include "askmesh.tiers" $root | fromYaml) $tier -}}
{{- $fullname := include "askmesh.fullname" $root -}}
{{- $prefix := printf "ASKMESH_%s_" (upper $tier) -}}
{{- $http := $spec.http | default false -}}
{{- $portName := ternary "http" "grpc" $http -}}
{{- /* The web tier acts for each caller with the caller's own key: it gets no internal token. */ -}}
{{- $mountAuth := and $root.Values.auth.enabled (not $http) -}}
{{- $tag := $v.image.tag -}}
{{- if eq .track "canary" }}{{ $tag = $v.canary.image.tag }}{{ end -}}
{{- $minimum := add $v.preStopSleepSeconds $v.drainGraceSeconds 2 -}}
{{- if le (int $v.terminationGracePeriodSeconds) (int $minimum) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + drainGraceSeconds + 2 (%v), or Kubernetes kills calls the drain would let finish" $tier $v.terminationGracePeriodSeconds $minimum) -}}
{{- end -}}
metadata:
  labels:
    {{- include "askmesh.selector" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $tier }}
    askmesh.io/track: {{ .track }}
  annotations:
    {{- if $root.Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $root.Values.metrics.port | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "askmesh.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile: {type: RuntimeDefault}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    {{- if $v.topologySpreadConstraints }}
    {{- toYaml $v.topologySpreadConstraints | nindent 4 }}
    {{- else }}
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "askmesh.selector" $root | nindent 10 }}
          app.kubernetes.io/component: {{ $tier }}
          askmesh.io/track: {{ .track }}
    {{- end }}
  containers:
    - name: {{ $tier }}
      image: {{ include "askmesh.image" (dict "root" $root "tag" $tag) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: [{{ $tier }}]
      ports:
        - {name: {{ $portName }}, containerPort: {{ $spec.port }}, protocol: TCP}
        - {name: metrics, containerPort: {{ $root.Values.metrics.port }}, protocol: TCP}
      env:
        - {name: {{ $prefix }}PORT, value: {{ $spec.port | quote }}}
        - {name: {{ $prefix }}METRICS_PORT, value: {{ $root.Values.metrics.port | quote }}}
        - {name: {{ $prefix }}GRACE_PERIOD_S, value: {{ $v.drainGraceSeconds | quote }}}
        - {name: {{ $prefix }}LOG_LEVEL, value: {{ $v.logLevel | quote }}}
        - {name: HOME, value: /var/lib/askmesh}
        {{- range $other := $spec.calls }}
        - {name: {{ $prefix }}{{ upper $other }}_ADDRESS, value: {{ include "askmesh.internalAddress" $root }}}
        {{- end }}
        {{- if $mountAuth }}
        - {name: ASKMESH_AUTH_ENABLED, value: "true"}
        - {name: ASKMESH_AUTH_INTERNAL_TOKEN_FILE, value: /var/run/secrets/askmesh/auth/internal-token}
        - {name: ASKMESH_AUTH_OPERATOR_KEY_FILE, value: /var/run/secrets/askmesh/auth/operator-key}
        {{- else }}
        - {name: ASKMESH_AUTH_ENABLED, value: {{ $root.Values.auth.enabled | quote }}}
        {{- end }}
        {{- if $root.Values.telemetry.otlpEndpoint }}
        - {name: ASKMESH_OTEL_EXPORTER, value: otlp}
        - {name: ASKMESH_OTEL_ENDPOINT, value: {{ $root.Values.telemetry.otlpEndpoint | quote }}}
        {{- end }}
        # Read by the OpenTelemetry SDK's default sampler.
        - {name: OTEL_TRACES_SAMPLER, value: parentbased_traceidratio}
        - {name: OTEL_TRACES_SAMPLER_ARG, value: {{ $root.Values.telemetry.samplingRatio | quote }}}
        {{- if and (eq $root.Values.models.source "volume") (has $tier (list "embedder" "generator")) }}
        - {name: {{ $prefix }}MODEL_PATH, value: {{ ternary $root.Values.models.embedderPath $root.Values.models.generatorPath (eq $tier "embedder") | quote }}}
        {{- end }}
        {{- if eq $tier "retriever" }}
        {{- if eq $root.Values.milvus.mode "lite" }}
        - {name: ASKMESH_RETRIEVER_MILVUS_URI, value: {{ printf "http://%s-milvus:19530" $fullname }}}
        {{- else if eq $root.Values.milvus.mode "external" }}
        - {name: ASKMESH_RETRIEVER_MILVUS_URI, value: {{ required "milvus.external.uri is required when milvus.mode is external" $root.Values.milvus.external.uri | quote }}}
        {{- with $root.Values.milvus.external.tokenSecret }}{{ if .name }}
        - name: ASKMESH_RETRIEVER_MILVUS_TOKEN
          valueFrom: {secretKeyRef: {name: {{ .name }}, key: {{ .key }}}}
        {{- end }}{{ end }}
        {{- else }}
        {{- fail "milvus.mode must be lite or external" }}
        {{- end }}
        {{- end }}
        {{- if eq $tier "ingestor" }}
        {{- if eq $root.Values.postgresql.mode "statefulset" }}
        {{- $pg := $root.Values.postgresql.statefulset }}
        - name: ASKMESH_POSTGRES_PASSWORD
          valueFrom: {secretKeyRef: {name: {{ $pg.auth.existingSecret }}, key: {{ $pg.auth.passwordKey }}}}
        # Kubernetes expands $(ASKMESH_POSTGRES_PASSWORD): the password stays in its Secret.
        - {name: ASKMESH_INGESTOR_STORE_URL, value: {{ printf "postgresql://%s:$(ASKMESH_POSTGRES_PASSWORD)@%s-postgresql:5432/%s" $pg.user $fullname $pg.database | quote }}}
        {{- else if eq $root.Values.postgresql.mode "external" }}
        - name: ASKMESH_INGESTOR_STORE_URL
          valueFrom: {secretKeyRef: {name: {{ required "postgresql.external.urlSecret.name is required" $root.Values.postgresql.external.urlSecret.name }}, key: {{ $root.Values.postgresql.external.urlSecret.key }}}}
        {{- else }}
        {{- fail "postgresql.mode must be statefulset or external: ingestor replicas on many nodes cannot share a SQLite file" }}
        {{- end }}
        {{- end }}
        {{- if eq $tier "generator" }}
        {{- $backend := $v.backend }}
        {{- if eq $backend "local" }}
        - {name: ASKMESH_GENERATOR_BACKEND, value: local}
        {{- else if eq $backend "vllm" }}
        - {name: ASKMESH_GENERATOR_BACKEND, value: openai}
        - {name: ASKMESH_GENERATOR_URL, value: {{ printf "http://%s-vllm:8000" $fullname }}}
        - {name: ASKMESH_GENERATOR_REMOTE_MODEL, value: {{ $root.Values.vllm.servedModelName | quote }}}
        {{- else if eq $backend "tgi" }}
        - {name: ASKMESH_GENERATOR_BACKEND, value: tgi}
        - {name: ASKMESH_GENERATOR_URL, value: {{ printf "http://%s-tgi:8080" $fullname }}}
        {{- else if eq $backend "openai" }}
        - {name: ASKMESH_GENERATOR_BACKEND, value: openai}
        - {name: ASKMESH_GENERATOR_URL, value: {{ required "generator.openai.url is required when generator.backend is openai" $v.openai.url | quote }}}
        - {name: ASKMESH_GENERATOR_REMOTE_MODEL, value: {{ $v.openai.model | quote }}}
        {{- with $v.openai.apiKeySecret }}{{ if .name }}
        - name: ASKMESH_GENERATOR_API_KEY
          valueFrom: {secretKeyRef: {name: {{ .name }}, key: {{ .key }}}}
        {{- end }}{{ end }}
        {{- else }}
        {{- fail "generator.backend must be local, vllm, tgi or openai" }}
        {{- end }}
        {{- end }}
        {{- range $name, $value := $v.env }}
        - {name: {{ $name }}, value: {{ $value | quote }}}
        {{- end }}
      {{- $probe := ternary (dict "httpGet" (dict "path" $spec.health "port" "http")) (dict "grpc" (dict "port" $spec.port "service" $spec.health)) $http }}
      startupProbe:
        {{- toYaml $probe | nindent 8 }}
        periodSeconds: {{ $v.startupProbe.periodSeconds }}
        failureThreshold: {{ $v.startupProbe.failureThreshold }}
        timeoutSeconds: 2
      readinessProbe:
        {{- toYaml $probe | nindent 8 }}
        periodSeconds: {{ $v.readinessProbe.periodSeconds }}
        failureThreshold: {{ $v.readinessProbe.failureThreshold }}
        timeoutSeconds: 2
      livenessProbe:
        {{- toYaml $probe | nindent 8 }}
        periodSeconds: {{ $v.livenessProbe.periodSeconds }}
        failureThreshold: {{ $v.livenessProbe.failureThreshold }}
        timeoutSeconds: 5
      lifecycle:
        # Endpoints first, then SIGTERM: the pod keeps serving while its removal propagates.
        preStop:
          exec:
            command: [sleep, {{ $v.preStopSleepSeconds | quote }}]
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
      volumeMounts:
        - {name: data, mountPath: /var/lib/askmesh}
        - {name: tmp, mountPath: /tmp}
        {{- if $mountAuth }}
        - {name: auth, mountPath: /var/run/secrets/askmesh/auth, readOnly: true}
        {{- end }}
        {{- if and (eq $root.Values.models.source "volume") (has $tier (list "embedder" "generator")) }}
        - {name: models, mountPath: {{ $root.Values.models.mountPath }}, readOnly: true}
        {{- end }}
  volumes:
    # Working folder (.askmesh/: ONNX exports, parse scratch) and /tmp: the root file system is read-only.
    - {name: data, emptyDir: {}}
    - {name: tmp, emptyDir: {}}
    {{- if $mountAuth }}
    - name: auth
      secret:
        secretName: {{ $root.Values.auth.existingSecret }}
        defaultMode: 0440
        items:
          - {key: {{ $root.Values.auth.internalTokenKey }}, path: internal-token}
          - {key: {{ $root.Values.auth.operatorKeyKey }}, path: operator-key}
    {{- end }}
    {{- if and (eq $root.Values.models.source "volume") (has $tier (list "embedder" "generator")) }}
    {{- if not $root.Values.models.volume }}
    {{- fail "models.volume is required when models.source is volume (e.g. {persistentVolumeClaim: {claimName: askmesh-models}})" }}
    {{- end }}
    - name: models
      {{- toYaml $root.Values.models.volume | nindent 6 }}
    {{- end }}
{{- end -}}
