{{/* Names: <release> when it contains the chart's name, else <release>-<chart>; 63 characters at most. */}}
{{- define "kvgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.fullname" -}}
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

{{- define "kvgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ include "kvgate.chart" . }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The port kvgate listens on: config.listen.port. */}}
{{- define "kvgate.port" -}}
{{- (.Values.config.listen | default dict).port | default 8080 | int }}
{{- end }}

{{/* vLLM's model as a label value (llm-d.ai/model), the form discovery's model_label matches (label_safe). */}}
{{- define "kvgate.vllmModelLabel" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" .Values.vllm.model "-" | trunc 63 | trimAll "-._" }}
{{- end }}

{{/*
The pools of the gateway config, as the config's `pools` mapping. A pool without endpoints (and
without its own `discovery`) is discovered when discovery.enabled, else gets the example vLLM
StatefulSet's pods when vllm.enabled, else the chart refuses to render.
*/}}
{{- define "kvgate.pools" -}}
{{- $pools := dict }}
{{- if eq .Values.mode "sidecar" }}
{{- $url := printf "http://127.0.0.1:%d" (int .Values.vllm.port) }}
{{- $_ := set $pools .Values.vllm.model (dict "policy" (dict "name" "round_robin") "endpoints" (list (dict "url" $url))) }}
{{- else }}
{{- range $i, $item := .Values.pools }}
{{- $pool := omit $item "model" }}
{{- if hasKey $pools $item.model }}
{{- fail (printf "pools[%d]: model %s appears twice" $i $item.model) }}
{{- end }}
{{- if not (or $pool.endpoints (hasKey $pool "discovery")) }}
{{- if $.Values.discovery.enabled }}
{{- $kube := mustMergeOverwrite (deepCopy $.Values.discovery.kubernetes) ($pool.kubernetes | default dict) }}
{{- $_ := set $pool "discovery" "kubernetes" }}
{{- $_ := set $pool "kubernetes" $kube }}
{{- else if $.Values.vllm.enabled }}
{{- $v := $.Values.vllm }}
{{- $endpoints := list }}
{{- range $n := until (int $v.replicas) }}
{{- $host := printf "%s-%d.%s" $v.name $n $v.name }}
{{- $ep := dict "url" (printf "http://%s:%d" $host (int $v.port)) }}
{{- if $v.kvEvents.enabled }}
{{- $_ := set $ep "kv_events" (printf "tcp://%s:%d" $host (int $v.kvEvents.port)) }}
{{- $_ := set $ep "kv_events_replay" (printf "tcp://%s:%d" $host (int $v.kvEvents.replayPort)) }}
{{- end }}
{{- $endpoints = append $endpoints $ep }}
{{- end }}
{{- $_ := set $pool "endpoints" $endpoints }}
{{- else }}
{{- fail (printf "pools[%d] (%s) lists no endpoints: give them, or set discovery.enabled or vllm.enabled" $i $item.model) }}
{{- end }}
{{- end }}
{{- $_ := set $pools $item.model $pool }}
{{- end }}
{{- end }}
{{- toYaml $pools }}
{{- end }}

{{/* The whole gateway config file (kvgate.yaml). */}}
{{- define "kvgate.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- if eq .Values.mode "sidecar" }}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy .Values.sidecar.config) }}
{{- end }}
{{- $_ := set $cfg "pools" (include "kvgate.pools" . | fromYaml) }}
{{- toYaml $cfg }}
{{- end }}

{{/* The kvgate container, shared by the gateway Deployment and the sidecar. */}}
{{- define "kvgate.container" -}}
- name: kvgate
  image: {{ include "kvgate.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - serve
    - --config
    - /etc/kvgate/kvgate.yaml
    {{- with .Values.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - {name: http, containerPort: {{ include "kvgate.port" . }}}
  {{- with .Values.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  readinessProbe:
    httpGet: {path: /ready, port: http}
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet: {path: /health, port: http}
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  resources:
    {{- toYaml (ternary .Values.sidecar.resources .Values.resources (eq .Values.mode "sidecar")) | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: [ALL]}
  volumeMounts:
    - {name: config, mountPath: /etc/kvgate, readOnly: true}
    - {name: tmp, mountPath: /tmp}
{{- end }}

{{- define "kvgate.volumes" -}}
- name: config
  configMap: {name: {{ include "kvgate.fullname" . }}}
- name: tmp
  emptyDir: {}
{{- end }}

{{/*
What of the config a change of must roll the pods. kvgate reloads its config file when its content
changes (reload.interval, 5 s; the kubelet updates a mounted ConfigMap within about a minute), and
applies these sections live (gateway/reload.py LIVE_SECTIONS): a change there keeps the pods, their
prefix index and learned rates. The other sections need a restart, and so does any change when
reload.interval is 0 (no polling).
*/}}
{{- define "kvgate.restartConfig" -}}
{{- $cfg := include "kvgate.config" . | fromYaml }}
{{- $interval := 5.0 }}
{{- if and (hasKey $cfg "reload") (hasKey ($cfg.reload | default dict) "interval") }}
{{- $interval = $cfg.reload.interval | float64 }}
{{- end }}
{{- if gt $interval 0.0 }}
{{- $cfg = omit $cfg "pools" "aliases" "auth" "retries" "forwarded" "reload" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Pod annotations: the checksum of what needs a restart (a change rolls the pods), Prometheus' hints. */}}
{{- define "kvgate.podAnnotations" -}}
checksum/config: {{ include "kvgate.restartConfig" . | sha256sum }}
{{- if .Values.prometheusAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "kvgate.port" . | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kvgate.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int ((.Values.config.timeouts | default dict).shutdown | default 30)) 10 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}
