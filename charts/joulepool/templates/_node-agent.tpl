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
      # time to reset every GPU's locked clocks on SIGTERM
      terminationGracePeriodSeconds: 30
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
            - --backend
            - {{ $a.backend }}
            - --metrics-port
            - {{ $a.metricsPort | quote }}
            - --namespace
            - $(POD_NAMESPACE)
            {{- if $simulated }}
            - --gpu-state
            - {{ $stateDir }}/state.json
            - --product
            - {{ $gpu.product | quote }}
            - --count
            - {{ $gpu.count | quote }}
            {{- if not $a.clockControl }}
            - --sim-unprivileged
            {{- end }}
            {{- end }}
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
      nodeSelector:
        {{- $sel := deepCopy ($a.nodeSelector | default dict) }}
        {{- if $gpu }}
        {{- $_ := set $sel "nvidia.com/gpu.product" $gpu.label }}
        {{- end }}
        {{- toYaml $sel | nindent 8 }}
      {{- with $a.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $a.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
