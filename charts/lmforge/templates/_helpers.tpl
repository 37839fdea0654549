{{/*
Chart name, truncated to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "lmforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, prefixed with the chart name unless it already contains it.
*/}}
{{- define "lmforge.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "lmforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object the chart renders.
*/}}
{{- define "lmforge.labels" -}}
helm.sh/chart: {{ include "lmforge.chart" . }}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the operator's objects (Deployment, Service, ServiceAccount, RBAC).
*/}}
{{- define "lmforge.operatorLabels" -}}
{{ include "lmforge.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector labels of the operator's pod (immutable in a Deployment: never add to them).
*/}}
{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference: repository, then @digest when set, else :tag (defaulting to the chart's appVersion).
Call with (dict "image" .Values.image "root" $).
*/}}
{{- define "lmforge.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Namespaces the operator watches; empty means all namespaces. With namespaced RBAC an empty list means the
release namespace only (there is no cluster-wide permission to watch the others).
*/}}
{{- define "lmforge.watchNamespaces" -}}
{{- $ns := .Values.watchNamespaces | default list }}
{{- if and .Values.rbac.namespaced (empty $ns) }}
{{- $ns = list .Release.Namespace }}
{{- end }}
{{- toJson (uniq $ns) }}
{{- end }}
