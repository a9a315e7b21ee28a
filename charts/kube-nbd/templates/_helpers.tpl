{{/*
Named templates shared by every manifest. Names and labels are computed here, once, so that a
selector in a Service always matches the labels of the pods it selects, and a rename cannot
leave one object behind.
*/}}

{{/*
The chart name, overridable. Truncated to 63 characters because it ends up in label values,
which Kubernetes caps at 63.
*/}}
{{- define "kube-nbd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name. When the release name already contains the chart name
("kube-nbd", "kube-nbd-prod") it is used as is, to avoid "kube-nbd-kube-nbd-operator".
Truncated to 46 characters: with the longest suffix appended ("-operator") every object name
stays a valid 63-character DNS label, with room to spare for longer suffixes later.
*/}}
{{- define "kube-nbd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"name-version" for the helm.sh/chart label; "+" is not allowed in label values.
*/}}
{{- define "kube-nbd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels on every object. Call with (dict "ctx" $ "component" "operator"): the component label
tells apart the objects of the operator, the agent and the shared ones (crds, csi-driver).
commonLabels come last so a user can add labels but not silently replace the selector labels,
which are computed from the same inputs below.
*/}}
{{- define "kube-nbd.labels" -}}
{{ include "kube-nbd.selectorLabels" . }}
app.kubernetes.io/part-of: kube-nbd
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "kube-nbd.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The subset of labels used in selectors. Selectors of Deployments and DaemonSets are immutable,
so this set must never include anything that changes between releases (version, chart).
*/}}
{{- define "kube-nbd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kube-nbd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The image reference. A digest wins over a tag: it is the only reference that cannot move.
The default tag is the chart's appVersion, so chart and image are released together.
*/}}
{{- define "kube-nbd.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
ServiceAccount names: the chart's own unless the user brings one.
*/}}
{{- define "kube-nbd.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "kube-nbd.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kube-nbd.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "kube-nbd.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The CSI driver name. Not a value: the agent answers GetPluginInfo with "nbd.dev"
(nbd_api.CSI_DRIVER), and a CSIDriver object of another name would register a driver no plugin
serves.
*/}}
{{- define "kube-nbd.csiDriverName" -}}
nbd.dev
{{- end -}}

{{/*
Paths on the node derived from the kubelet directory. The registration socket path is the one
the kubelet dials, so it is the host path, not the path inside the agent container.
*/}}
{{- define "kube-nbd.agent.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.agent.kubeletDir) (include "kube-nbd.csiDriverName" .) -}}
{{- end -}}

{{- define "kube-nbd.agent.registrationDir" -}}
{{- printf "%s/plugins_registry" (trimSuffix "/" .Values.agent.kubeletDir) -}}
{{- end -}}

{{- define "kube-nbd.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "kube-nbd.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}
