{{- /*
The node agent DaemonSet. Called with (dict "ctx" $ "gpu" <fakeGPUs.products
entry, or nil for the real NVML backend>).

Locking clocks on a real GPU needs CAP_SYS_ADMIN, and Kubernetes only grants
added capabilities to a root process (it sets no ambient capabilities): with
backend nvml and clockControl this is the one container that runs as root
with SYS_ADMIN. Otherwise it runs non-root with no capabilities, and the
agent measures without locking clocks (monitor-only).
*/}}
{{- define "joulepool.nodeAgent.daemonSet" -}}
{{- $ := .ctx }}
{{- $gpu := .gpu }}
{{- $a := $.Values.nodeAgent }}
{{- $simulated := eq $a.backend "simulated" }}
{{- $privileged := and (not $simulated) $a.clockControl }}
{{- $ctx := dict "ctx" $ "component" "node-agent" }}
{{- $stateDir := "/var/run/joulepool/gpus" }}
{{- $podResourcesDir := "/var/lib/kubelet/pod-resources" }}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "joulepool.fullname" $ }}-node-agent{{ if $gpu }}-{{ $gpu.product | lower }}{{ end }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "joulepool.labels" $ctx | nindent 4 }}
    {{- if $gpu }}
    joulepool.dev/gpu-product: {{ $gpu.product | quote }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "joulepool.selectorLabels" $ctx | nindent 6 }}
      {{- if $gpu }}
      joulepool.dev/gpu-product: {{ $gpu.product | quote }}
      {{- end }}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1
  template:
    metadata:
      labels:
        {{- include "joulepool.selectorLabels" $ctx | nindent 8 }}
        {{- if $gpu }}
        joulepool.dev/gpu-product: {{ $gpu.product | quote }}
        {{- end }}
      {{- with $a.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "joulepool.serviceAccountName" $ctx }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and (not $simulated) $a.runtimeClassName }}
      runtimeClassName: {{ $a.runtimeClassName }}
      {{- end }}
      {{- with $a.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      # time to reset every GPU's locked clocks on SIGTERM (the agent retries
      # failed resets for --reset-grace, 5 s less)
      terminationGracePeriodSeconds: {{ $a.terminationGracePeriodSeconds }}
      securityContext:
        {{- if $privileged }}
        runAsNonRoot: false
        runAsUser: 0
        runAsGroup: 0
        seccompProfile:
          type: RuntimeDefault
        {{- else }}
        {{- include "joulepool.podSecurityContext" $ | nindent 8 }}
        {{- end }}
      {{- if $simulated }}
      initContainers:
        {{- include "joulepool.gpuStateInit" (dict "ctx" $ "resources" $a.resources) | nindent 8 }}
      {{- end }}
      containers:
        - name: agent
          image: {{ include "joulepool.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args:
            - --log-level
            - {{ $.Values.logLevel | quote }}
            - node-agent
            {{- include "joulepool.nodeAgent.backendArgs" . | nindent 12 }}
            - --metrics-port
            - {{ $a.metricsPort | quote }}
            - --namespace
            - $(POD_NAMESPACE)
            {{- with $a.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "joulepool.commonEnv" $ | nindent 12 }}
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            {{- if not $simulated }}
            # the NVIDIA runtime injects the driver and every GPU without
            # allocating any: the agent watches GPUs, it does not use them
            - name: NVIDIA_VISIBLE_DEVICES
              value: all
            - name: NVIDIA_DRIVER_CAPABILITIES
              value: utility
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $a.metricsPort }}
              protocol: TCP
          livenessProbe:
            httpGet:
              path: /healthz
              port: metrics
            initialDelaySeconds: 10
            periodSeconds: 20
            timeoutSeconds: 5
          readinessProbe:
            httpGet:
              path: /healthz
              port: metrics
            periodSeconds: 10
            timeoutSeconds: 5
          securityContext:
            {{- if $privileged }}
            # the API server rejects allowPrivilegeEscalation=false with SYS_ADMIN
            allowPrivilegeEscalation: true
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
              add: ["SYS_ADMIN"]
            {{- else }}
            {{- include "joulepool.containerSecurityContext" $ | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml $a.resources | nindent 12 }}
          volumeMounts:
            {{- include "joulepool.tmpMount" $ | nindent 12 }}
            # the kubelet's PodResources socket: which GPUs (UUIDs) each engine
            # pod was allocated, so each GPU gets its own engines' signals
            - name: pod-resources
              mountPath: {{ $podResourcesDir }}
              readOnly: true
            {{- if $simulated }}
            - name: gpu-state
              mountPath: {{ $stateDir }}
            {{- end }}
      volumes:
        {{- include "joulepool.tmpVolume" $ | nindent 8 }}
        # OrCreate: a node with another kubelet root dir must still get its agent
        # (clock safety); there the socket is missing and the agent says so
        - name: pod-resources
          hostPath:
            path: {{ $podResourcesDir }}
            type: DirectoryOrCreate
        {{- if $simulated }}
        {{- include "joulepool.gpuStateVolume" $ | nindent 8 }}
        {{- end }}
      {{- include "joulepool.nodeAgent.placement" . | nindent 6 }}
{{- end }}

{{- /* Backend flags of every node-agent container that touches GPUs. Called with
the daemonSet's dict. */}}
{{- define "joulepool.nodeAgent.backendArgs" -}}
{{- $a := .ctx.Values.nodeAgent }}
- --backend
- {{ $a.backend }}
- --control
- {{ $a.control }}
- --reset-grace
- {{ include "joulepool.nodeAgent.resetGrace" .ctx | quote }}
{{- if eq $a.backend "simulated" }}
- --gpu-state
- /var/run/joulepool/gpus/state.json
- --product
- {{ .gpu.product | quote }}
- --count
- {{ .gpu.count | quote }}
{{- if not $a.clockControl }}
- --sim-unprivileged
{{- end }}
{{- end }}
{{- end }}

{{- /* Seconds the agent retries failed resets on stop: inside the pod's grace period. */}}
{{- define "joulepool.nodeAgent.resetGrace" -}}
{{- max 1 (sub (int .Values.nodeAgent.terminationGracePeriodSeconds) 5) }}
{{- end }}

{{- /* The nodes of a node-agent DaemonSet (the agent's and the uninstall reset's). */}}
{{- define "joulepool.nodeAgent.placement" -}}
{{- $a := .ctx.Values.nodeAgent }}
nodeSelector:
  {{- $sel := deepCopy ($a.nodeSelector | default dict) }}
  {{- if .gpu }}
  {{- $_ := set $sel "nvidia.com/gpu.product" .gpu.label }}
  {{- end }}
  {{- toYaml $sel | nindent 2 }}
{{- with $a.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $a.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- /* Annotations of a post-delete hook with this weight. */}}
{{- define "joulepool.nodeAgent.hook" -}}
helm.sh/hook: post-delete
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{- /* A hook Job that runs `node-agent <args>` to wait for something (see
node-agent-uninstall.yaml). Called with (dict "ctx" "name" "weight" "args" "sa"
"timeout"). */}}
{{- define "joulepool.nodeAgent.awaitJob" -}}
{{- $ := .ctx }}
{{- $c := dict "ctx" $ "component" "node-agent-reset" }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "joulepool.fullname" $ }}-{{ .name }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "joulepool.labels" $c | nindent 4 }}
  annotations:
    {{- include "joulepool.nodeAgent.hook" .weight | nindent 4 }}
spec:
  backoffLimit: 2
  activeDeadlineSeconds: {{ add .timeout 60 }}
  template:
    metadata:
      labels:
        {{- include "joulepool.selectorLabels" $c | nindent 8 }}
    spec:
      serviceAccountName: {{ .sa }}
      restartPolicy: Never
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "joulepool.podSecurityContext" $ | nindent 8 }}
      containers:
        - name: wait
          image: {{ include "joulepool.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args:
            - --log-level
            - {{ $.Values.logLevel | quote }}
            - node-agent
            {{- toYaml .args | nindent 12 }}
            - --await-timeout
            - {{ .timeout | quote }}
            - --namespace
            - $(POD_NAMESPACE)
          env:
            {{- include "joulepool.commonEnv" $ | nindent 12 }}
          securityContext:
            {{- include "joulepool.containerSecurityContext" $ | nindent 12 }}
          resources:
            {{- toYaml $.Values.nodeAgent.resources | nindent 12 }}
          volumeMounts:
            {{- include "joulepool.tmpMount" $ | nindent 12 }}
      volumes:
        {{- include "joulepool.tmpVolume" $ | nindent 8 }}
{{- end }}

{{- /* The uninstall reset DaemonSet: on the agent DaemonSet's nodes, an init
container resets every GPU (`node-agent --reset-and-exit`, root + SYS_ADMIN
like the agent when it locks real clocks), then an unprivileged container
holds the pod Ready. Called like joulepool.nodeAgent.daemonSet. */}}
{{- define "joulepool.nodeAgent.resetDaemonSet" -}}
{{- $ := .ctx }}
{{- $gpu := .gpu }}
{{- $a := $.Values.nodeAgent }}
{{- $simulated := eq $a.backend "simulated" }}
{{- $privileged := and (not $simulated) $a.clockControl }}
{{- $c := dict "ctx" $ "component" "node-agent-reset" }}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "joulepool.fullname" $ }}-node-agent-reset{{ if $gpu }}-{{ $gpu.product | lower }}{{ end }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "joulepool.labels" $c | nindent 4 }}
    {{- if $gpu }}
    joulepool.dev/gpu-product: {{ $gpu.product | quote }}
    {{- end }}
  annotations:
    {{- include "joulepool.nodeAgent.hook" "5" | nindent 4 }}
spec:
  selector:
    matchLabels:
      {{- include "joulepool.selectorLabels" $c | nindent 6 }}
      {{- if $gpu }}
      joulepool.dev/gpu-product: {{ $gpu.product | quote }}
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "joulepool.selectorLabels" $c | nindent 8 }}
        {{- if $gpu }}
        joulepool.dev/gpu-product: {{ $gpu.product | quote }}
        {{- end }}
    spec:
      # no Kubernetes API: NVML (or the simulated state file) only
      automountServiceAccountToken: false
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and (not $simulated) $a.runtimeClassName }}
      runtimeClassName: {{ $a.runtimeClassName }}
      {{- end }}
      {{- with $a.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: 5
      securityContext:
        {{- include "joulepool.podSecurityContext" $ | nindent 8 }}
      initContainers:
        - name: reset
          image: {{ include "joulepool.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args:
            - --log-level
            - {{ $.Values.logLevel | quote }}
            - node-agent
            - --reset-and-exit
            {{- include "joulepool.nodeAgent.backendArgs" . | nindent 12 }}
          env:
            {{- include "joulepool.commonEnv" $ | nindent 12 }}
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            {{- if not $simulated }}
            - name: NVIDIA_VISIBLE_DEVICES
              value: all
            - name: NVIDIA_DRIVER_CAPABILITIES
              value: utility
            {{- end }}
          securityContext:
            {{- if $privileged }}
            # SYS_ADMIN is effective for root only (see the agent's DaemonSet)
            runAsNonRoot: false
            runAsUser: 0
            runAsGroup: 0
            allowPrivilegeEscalation: true
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
              add: ["SYS_ADMIN"]
            {{- else }}
            {{- include "joulepool.containerSecurityContext" $ | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml $a.resources | nindent 12 }}
          volumeMounts:
            {{- include "joulepool.tmpMount" $ | nindent 12 }}
            {{- if $simulated }}
            - name: gpu-state
              mountPath: /var/run/joulepool/gpus
            {{- end }}
      containers:
        # Ready once the init container reset this node; touches no GPU
        - name: hold
          image: {{ include "joulepool.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args:
            - node-agent
            - --hold
          securityContext:
            {{- include "joulepool.containerSecurityContext" $ | nindent 12 }}
          resources:
            requests:
              cpu: 10m
              memory: 64Mi
            limits:
              cpu: 100m
              memory: 128Mi
          volumeMounts:
            {{- include "joulepool.tmpMount" $ | nindent 12 }}
      volumes:
        {{- include "joulepool.tmpVolume" $ | nindent 8 }}
        {{- if $simulated }}
        {{- include "joulepool.gpuStateVolume" $ | nindent 8 }}
        {{- end }}
      {{- include "joulepool.nodeAgent.placement" . | nindent 6 }}
{{- end }}
