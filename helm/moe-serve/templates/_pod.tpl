{{/* A Ray pod template. Called with (dict "root" $ "role" "head"|"attention"|"experts" "group" <values>).
Every pod mounts the checkpoint: the head's Serve controller opens it to build the app, and
each replica reads the tensors it owns. */}}
{{- define "moe-serve.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $head := eq .role "head" }}
{{- $dir := include "moe-serve.modelDir" $root -}}
metadata:
  labels:
    {{- include "moe-serve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.model.uri }}
  initContainers:
    - name: fetch-model
      image: {{ $v.model.download.image }}
      command:
        {{- toYaml $v.model.download.command | nindent 8 }}
      env:
        - {name: MODEL_URI, value: {{ $v.model.uri | quote }}}
        - {name: MODEL_DIR, value: {{ $dir | quote }}}
        {{- with $v.model.download.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.model.download.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.model.download.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: model, mountPath: {{ $v.model.mountPath | quote }}}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $head }}
      image: {{ include "moe-serve.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      env:
        # As cluster/serve/builder.py RAY_ENV: Serve's throughput settings (the proxy and the
        # controller read them from here), and replicas at the ordinary priority.
        - {name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, value: "0"}
        - {name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP, value: "0"}
        - {name: RAY_worker_niceness, value: "0"}
        - {name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, value: "cluster.serve.proxy_setup:setup"}
        # The gRPC proxy takes messages as large as an HTTP body may be (Serve's default is 2 GiB).
        - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
          value: {{ dig "limits" "max_body_bytes" 4194304 $v.serve.config | int | quote }}
        {{- with include "moe-serve.apiKeySecret" $root }}
        # The front door's API key; read where the Frontend replica runs, which may be any pod.
        - name: MOE_SERVE_API_KEY
          valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $v.apiKey.secretKey }}}}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- if $head }}
        - {name: gcs, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ $v.ports.http }}}
        - {name: serve-grpc, containerPort: {{ $v.ports.grpc }}}
        - {name: metrics, containerPort: 8080}
      {{- $res := deepCopy (default dict .group.resources) }}
      {{- if not $head }}
      {{- $gpus := dict "nvidia.com/gpu" (int .group.gpusPerPod) }}
      {{- $_ := set $res "limits" (merge (default dict $res.limits) $gpus) }}
      {{- $_ := set $res "requests" (merge (default dict $res.requests) $gpus) }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if not $head }}
      {{- with $v.probes }}
      {{- if .startup.enabled }}
      startupProbe:
        httpGet: {path: /health, port: serve}
        {{- toYaml (omit .startup "enabled") | nindent 8 }}
      {{- end }}
      {{- if .liveness.enabled }}
      livenessProbe:
        httpGet: {path: /health, port: serve}
        {{- toYaml (omit .liveness "enabled") | nindent 8 }}
      {{- end }}
      {{- if .readiness.enabled }}
      readinessProbe:
        {{- if .readiness.grpc }}
        # The kubelet's own gRPC health check, through this pod's gRPC proxy to the front door.
        grpc: {port: {{ $v.ports.grpc }}, service: moe_serve.generation.v1.Generation}
        {{- else }}
        httpGet: {path: /ready, port: serve}
        {{- end }}
        {{- toYaml (omit .readiness "enabled" "grpc") | nindent 8 }}
      {{- end }}
      {{- end }}
      {{- end }}
      volumeMounts:
        - {name: dshm, mountPath: /dev/shm}
        {{- if $dir }}
        - {name: model, mountPath: {{ $v.model.mountPath | quote }}, readOnly: true}
        {{- end }}
        {{- if $v.expertTLS.secretName }}
        - {name: expert-tls, mountPath: {{ $v.expertTLS.mountPath | quote }}, readOnly: true}
        {{- end }}
  volumes:
    # Ray's object store lives in shared memory; the container default of 64 MiB is far too small.
    - name: dshm
      emptyDir: {medium: Memory{{ with $v.shmSize }}, sizeLimit: {{ . }}{{ end }}}
    {{- if $v.model.pvc.claimName }}
    - name: model
      persistentVolumeClaim: {claimName: {{ $v.model.pvc.claimName | quote }}, readOnly: true}
    {{- else if $v.model.uri }}
    - name: model
      emptyDir: {{ if $v.model.download.sizeLimit }}{sizeLimit: {{ $v.model.download.sizeLimit }}}{{ else }}{}{{ end }}
    {{- end }}
    {{- if $v.expertTLS.secretName }}
    - name: expert-tls
      secret: {secretName: {{ $v.expertTLS.secretName | quote }}, defaultMode: 0400}
    {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
