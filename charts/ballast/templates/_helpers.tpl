{{/*
Names, labels, images and endpoints shared by the templates.
*/}}

{{- define "ballast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component names append a suffix, so keep room (40 + suffix). */}}
{{- define "ballast.fullname" -}}
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

{{- define "ballast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The CSI driver's name: compiled into ballast-csi, so not a value. */}}
{{- define "ballast.csiDriverName" -}}
csi.ballast.io
{{- end }}

{{/* Topology key reported by NodeGetInfo. */}}
{{- define "ballast.topologyKey" -}}
topology.ballast.io/node
{{- end }}

{{- define "ballast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ballast.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Call with (dict "root" $ "component" "storage-node"). */}}
{{- define "ballast.labels" -}}
helm.sh/chart: {{ include "ballast.chart" .root }}
{{ include "ballast.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: ballast
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Ballast image. */}}
{{- define "ballast.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A sidecar's image: call with the sidecar's values. */}}
{{- define "ballast.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}

{{- define "ballast.storageNodeName" -}}
{{- printf "%s-node" (include "ballast.fullname" .) }}
{{- end }}

{{/* ClusterIP Service of the storage nodes: what clients connect to. */}}
{{- define "ballast.storageServiceName" -}}
{{- printf "%s-node" (include "ballast.fullname" .) }}
{{- end }}

{{/* Headless Service of the storage nodes: one DNS record per node (peers, discovery). */}}
{{- define "ballast.storagePeersServiceName" -}}
{{- printf "%s-node-peers" (include "ballast.fullname" .) }}
{{- end }}

{{/* http://<storage Service>.<namespace>.svc.<cluster domain>:<port> */}}
{{- define "ballast.storageServiceEndpoint" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "ballast.storageServiceName" .) .Release.Namespace .Values.clusterDomain (int .Values.storage.port) }}
{{- end }}

{{- define "ballast.csiControllerEndpoint" -}}
{{- default (include "ballast.storageServiceEndpoint" .) .Values.csi.ballastEndpoint }}
{{- end }}

{{- define "ballast.extenderEndpoint" -}}
{{- default (include "ballast.storageServiceEndpoint" .) .Values.extender.ballastEndpoint }}
{{- end }}

{{- define "ballast.csiControllerName" -}}
{{- printf "%s-csi-controller" (include "ballast.fullname" .) }}
{{- end }}

{{- define "ballast.csiNodeName" -}}
{{- printf "%s-csi-node" (include "ballast.fullname" .) }}
{{- end }}

{{- define "ballast.csiMounterName" -}}
{{- printf "%s-csi-mounter" (include "ballast.fullname" .) }}
{{- end }}

{{/* The storage node endpoint of the node plugin and of the FUSE daemons (csi.node.endpointMode). */}}
{{- define "ballast.csiNodeBallastEndpoint" -}}
{{- if eq .Values.csi.node.endpointMode "local" -}}
http://$(KUBE_NODE_IP):{{ .Values.storage.port }}
{{- else -}}
{{ include "ballast.csiControllerEndpoint" . }}
{{- end }}
{{- end }}

{{- define "ballast.extenderName" -}}
{{- printf "%s-scheduler-extender" (include "ballast.fullname" .) }}
{{- end }}

{{- define "ballast.extenderImage" -}}
{{- if .Values.extender.image.repository }}
{{- printf "%s:%s" .Values.extender.image.repository (default .Chart.AppVersion .Values.extender.image.tag) }}
{{- else }}
{{- include "ballast.image" . }}
{{- end }}
{{- end }}

{{- define "ballast.extenderPullPolicy" -}}
{{- if .Values.extender.image.repository }}{{ .Values.extender.image.pullPolicy }}{{ else }}{{ .Values.image.pullPolicy }}{{ end }}
{{- end }}

{{/* The StorageClass nodeSelector parameter: sorted "key=value,key=value". */}}
{{- define "ballast.nodeSelectorParameter" -}}
{{- $pairs := list }}
{{- range $key := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (index $ $key | toString)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* The StorageClass used by `helm test`. */}}
{{- define "ballast.testStorageClassName" -}}
{{- if .Values.tests.storageClassName }}
{{- .Values.tests.storageClassName }}
{{- else }}
{{- $chosen := "" }}
{{- range .Values.storageClasses }}
{{- if and .default (not $chosen) }}{{ $chosen = .name }}{{ end }}
{{- end }}
{{- if and (not $chosen) .Values.storageClasses }}{{ $chosen = (first .Values.storageClasses).name }}{{ end }}
{{- $chosen }}
{{- end }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express. Each failure names the values to
change.
*/}}
{{- define "ballast.validate" -}}
{{- $storage := .Values.storage }}
{{- if eq $storage.device.type "file" }}
{{- $prefix := printf "%s/" (trimSuffix "/" $storage.hostPath) }}
{{- if not (hasPrefix $prefix $storage.device.path) }}
{{- fail (printf "storage.device.path %q must be under storage.hostPath %q for a file device (only hostPath is mounted)" $storage.device.path $storage.hostPath) }}
{{- end }}
{{- range $storage.nodes }}
{{- if and .device (not (hasPrefix $prefix .device)) }}
{{- fail (printf "storage.nodes[%s].device %q must be under storage.hostPath %q for a file device" .name .device $storage.hostPath) }}
{{- end }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $storage.nodes }}
{{- if hasKey $seen .name }}
{{- fail (printf "storage.nodes lists node %q twice" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- if and (eq .Values.csi.node.endpointMode "local") (not $storage.hostNetwork) }}
{{- fail "csi.node.endpointMode local needs storage.hostNetwork true (the node plugin reaches the storage node at the host's IP)" }}
{{- end }}
{{- $defaults := 0 }}
{{- $names := dict }}
{{- range .Values.storageClasses }}
{{- if .default }}{{ $defaults = add1 $defaults }}{{ end }}
{{- if gt (int .replicationMinimum) (int .replication) }}
{{- fail (printf "storageClasses %s: replicationMinimum %d exceeds replication %d" .name (int .replicationMinimum) (int .replication)) }}
{{- end }}
{{- if hasKey $names .name }}
{{- fail (printf "storageClasses lists %q twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- if gt $defaults 1 }}
{{- fail "storageClasses: at most one class may have default: true" }}
{{- end }}
{{- if and .Values.tests.enabled (not (include "ballast.testStorageClassName" .)) }}
{{- fail "tests.enabled needs a StorageClass: set tests.storageClassName or define storageClasses" }}
{{- end }}
{{- end }}

{{/*
The Kubernetes node whose storage node founds the cluster: storage.cluster.bootstrapNode, else
the first of storage.nodes, else none (every storage node founds its own one-node cluster).
*/}}
{{- define "ballast.bootstrapNode" -}}
{{- $cluster := .Values.storage.cluster -}}
{{- if $cluster.bootstrapNode -}}
{{- $cluster.bootstrapNode -}}
{{- else if .Values.storage.nodes -}}
{{- (first .Values.storage.nodes).name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the cluster's join secret (key join-secret). */}}
{{- define "ballast.joinSecretName" -}}
{{- default (printf "%s-join" (include "ballast.fullname" .)) .Values.storage.cluster.joinSecretName -}}
{{- end -}}

{{/* The host directory of the storage node's local socket (shared memory): mounted at the same
path into the storage node and into the pod that runs ballast-fuse, so the path the node reports
in its status resolves there too. */}}
{{- define "ballast.localSocketDir" -}}
{{- printf "%s/local" (trimSuffix "/" .Values.storage.hostPath) }}
{{- end }}
