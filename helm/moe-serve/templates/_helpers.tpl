{{/* Names. KubeRay appends suffixes (-raycluster-xxxxx, -serve-svc, worker group names) to
the RayService's name, so it is kept well under the 63 characters a label allows. */}}
{{- define "moe-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "moe-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moe-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the checkpoint is, when the chart provides it. */}}
{{- define "moe-serve.modelDir" -}}
{{- if or .Values.model.pvc.claimName .Values.model.uri }}
{{- trimSuffix "/" (printf "%s/%s" .Values.model.mountPath .Values.model.subPath) }}
{{- end }}
{{- end }}

{{/* The application's args: serve.config as given, with `model` pointing at the mounted
checkpoint and `expert_tls` at the mounted expertTLS Secret, unless the config sets them itself. */}}
{{- define "moe-serve.args" -}}
{{- $args := deepCopy .Values.serve.config }}
{{- $dir := include "moe-serve.modelDir" . }}
{{- if and $dir (not (hasKey $args "model")) }}
{{- $_ := set $args "model" $dir }}
{{- end }}
{{- with .Values.expertTLS }}
{{- if and .secretName (not (hasKey $args "expert_tls")) }}
{{- $tls := dict "ca_file" (printf "%s/ca.crt" .mountPath) "cert_file" (printf "%s/tls.crt" .mountPath)
      "key_file" (printf "%s/tls.key" .mountPath) "mutual" .mutual }}
{{- if .serverName }}{{ $_ := set $tls "server_name" .serverName }}{{ end }}
{{- $_ := set $args "expert_tls" $tls }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* The Secret holding the front door's API key: an existing one, the chart's own, or none. */}}
{{- define "moe-serve.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}{{ .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.create }}{{ include "moe-serve.fullname" . }}-api-key
{{- end }}
{{- end }}

{{/* What clients put in "model": the config's model_name, else the checkpoint folder's name. */}}
{{- define "moe-serve.modelName" -}}
{{- $args := include "moe-serve.args" . | fromYaml }}
{{- if $args.model_name }}{{ $args.model_name }}
{{- else if $args.model }}{{ base $args.model }}
{{- else }}tiny{{ end }}
{{- end }}

{{- define "moe-serve.appName" -}}
{{- default "moe-serve" .Values.serve.config.name }}
{{- end }}

{{/* serveConfigV2: Serve's proxies and the one application, as cluster.serve.builder.serve_config
makes it for `moe-serve up`: with autoscaling on (the config's default), the application-level
policy gets the app's config as its constructor argument. */}}
{{- define "moe-serve.serveConfig" -}}
{{- $args := include "moe-serve.args" . | fromYaml }}
{{- $app := dict "name" (include "moe-serve.appName" .) "route_prefix" "/"
      "import_path" "cluster.serve.builder:app_builder" "args" $args }}
{{- $auto := default dict $args.autoscaling }}
{{- $off := and (hasKey $auto "enabled") (not $auto.enabled) }}
{{- if and .Values.serve.autoscalingPolicy (not $off) }}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" .Values.serve.autoscalingPolicy
      "policy_kwargs" (dict "config" $args)) }}
{{- end }}
{{- /* As cluster/serve/builder.py GRPC_SERVICERS: Generation and grpc.health.v1.Health. */}}
{{- $grpc := dict "port" .Values.ports.grpc
      "grpc_servicer_functions" (list "cluster.api.grpc_register.add_generation_servicer"
                                      "cluster.api.grpc_register.add_health_servicer") }}
{{- toYaml (dict "http_options" (dict "host" "0.0.0.0" "port" .Values.ports.http)
                 "grpc_options" $grpc "applications" (list $app)) }}
{{- end }}

{{/* ray start's --resources: KubeRay hands the value to a shell, so it is a JSON string
inside double quotes with the inner quotes escaped: "{\"attention_node\":1}". */}}
{{- define "moe-serve.rayResources" -}}
{{- dict .nodeResource .gpusPerPod | toJson | toJson }}
{{- end }}

{{/* Refuse values whose replicas could never be placed: a deployment that asks for a custom
resource its worker group does not offer, or more GPUs at start than the group can grow to.
Serve would otherwise wait for them forever. */}}
{{- define "moe-serve.checks" -}}
{{- $cfg := .Values.serve.config }}
{{- /* The proxies listen on every interface of the pod: the app refuses to start without a key. */}}
{{- if not (or (include "moe-serve.apiKeySecret" .) $cfg.api_keys) }}
{{- fail "the front door listens beyond loopback and needs an API key: keep apiKey.create, set apiKey.existingSecret, or serve.config.api_keys" }}
{{- end }}
{{- /* The proxies listen on ports.*, which the Services and probes use too; a different
port in serve.config would be silently ignored. */}}
{{- range $key, $port := dict "http_port" .Values.ports.http "grpc_port" .Values.ports.grpc }}
{{- if and (hasKey $cfg $key) (ne (int (index $cfg $key)) (int $port)) }}
{{- fail (printf "serve.config.%s is %v but ports.%s is %v: the chart serves on ports.%s; set that instead" $key (index $cfg $key) (trimSuffix "_port" $key) $port (trimSuffix "_port" $key)) }}
{{- end }}
{{- end }}
{{- $asks := dict "attention" (list) "experts" (list) }}
{{- with $cfg.attention }}{{ $_ := set $asks "attention" (list .) }}{{ end }}
{{- $_ := set $asks "experts" (default list $cfg.expert_groups) }}
{{- range $role, $specs := $asks }}
{{- $g := index $.Values.workers $role }}
{{- $gpus := 0.0 }}
{{- range $specs }}
{{- range $res, $_ := default dict .resources }}
{{- if ne $res $g.nodeResource }}
{{- fail (printf "serve.config asks %s replicas for Ray resource %q, but workers.%s offers %q" $role $res $role $g.nodeResource) }}
{{- end }}
{{- end }}
{{- $gpus = addf $gpus (mulf (default 1 .replicas) (default 0 .num_gpus)) }}
{{- end }}
{{- if gt $gpus (mulf $g.maxReplicas $g.gpusPerPod) }}
{{- fail (printf "serve.config starts %s replicas on %v GPUs, but workers.%s grows to %v pods x %v GPUs" $role $gpus $role $g.maxReplicas $g.gpusPerPod) }}
{{- end }}
{{- end }}
{{- end }}
