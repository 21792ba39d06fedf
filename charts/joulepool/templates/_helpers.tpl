{{/* Chart name, truncated to a DNS label. */}}
{{- define "joulepool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart> unless the release already says it. */}}
{{- define "joulepool.fullname" -}}
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

{{- define "joulepool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "joulepool.labels" -}}
helm.sh/chart: {{ include "joulepool.chart" .ctx }}
{{ include "joulepool.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: joulepool
{{- end }}

{{- define "joulepool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "joulepool.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* The joulepool image. */}}
{{- define "joulepool.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The stock kube-scheduler image; the tag defaults to the cluster's version. */}}
{{- define "joulepool.schedulerImage" -}}
{{- $tag := .Values.scheduler.image.tag }}
{{- if not $tag }}
{{- $tag = regexReplaceAll "^(v[0-9]+\\.[0-9]+\\.[0-9]+).*$" .Capabilities.KubeVersion.Version "${1}" }}
{{- end }}
{{- printf "%s:%s" .Values.scheduler.image.repository $tag }}
{{- end }}

{{/* The operator's plan ConfigMap (joulepool.api.plan.PLAN_CONFIGMAP), in the release namespace. */}}
{{- define "joulepool.planConfigMap" -}}
joulepool-plan
{{- end }}

{{- define "joulepool.serviceAccountName" -}}
{{- printf "%s-%s" (include "joulepool.fullname" .ctx) .component }}
{{- end }}

{{/* Pod-level security context: non-root, RuntimeDefault seccomp. */}}
{{- define "joulepool.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security context: read-only root, no privilege escalation, no capabilities. */}}
{{- define "joulepool.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment every joulepool container gets. */}}
{{- define "joulepool.commonEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: PYTHONUNBUFFERED
  value: "1"
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{/* Scratch space: the root filesystem is read-only. */}}
{{- define "joulepool.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "joulepool.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
Init container that prepares the simulated GPUs' hostPath directory, shared on
a node by the node agent (uid 65532), the fake device plugin (uid 0, no
capabilities) and the fake engines (uid 65532). kubelet creates the directory
root-owned 0755: open it up (root owns it, so chmod needs no capability; no
sticky bit, since writers replace the state file atomically) and create the
writers' lock file 0666 before any of them can create it with their umask.
*/}}
{{- define "joulepool.gpuStateInit" -}}
- name: gpu-state-dir
  image: {{ include "joulepool.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os
      d = "/var/run/joulepool/gpus"
      os.chmod(d, 0o777)
      lock = os.path.join(d, "state.json.lock")
      os.close(os.open(lock, os.O_CREAT | os.O_RDWR, 0o666))
      if os.stat(lock).st_uid == os.getuid():
          os.chmod(lock, 0o666)
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    {{- include "joulepool.containerSecurityContext" .ctx | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: gpu-state
      mountPath: /var/run/joulepool/gpus
{{- end }}

{{- define "joulepool.gpuStateVolume" -}}
- name: gpu-state
  hostPath:
    path: {{ .Values.nodeAgent.simulatedStateDir }}
    type: DirectoryOrCreate
{{- end }}

{{/* The Secret holding the router's bearer token (router.auth). */}}
{{- define "joulepool.routerTokenSecret" -}}
{{- .Values.router.auth.existingSecret | default (printf "%s-router-token" (include "joulepool.fullname" .)) }}
{{- end }}

{{/* The GIE endpoint picker's Service (router --epp-port), named in GIE pools' endpointPickerRef */}}
{{- define "joulepool.pickerService" -}}
{{- printf "%s-epp" (include "joulepool.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
