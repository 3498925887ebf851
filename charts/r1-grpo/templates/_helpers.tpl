{{/*
Names. Resource names follow docs/contract.md: <release>-stages, <release>-<stage>-<attempt>,
<release>-controller. The release name is used as is (no fullnameOverride): the controller and
`r1-grpo status` derive every name from it.
*/}}
{{- define "r1-grpo.name" -}}
r1-grpo
{{- end -}}

{{- define "r1-grpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "r1-grpo.stagesConfigMap" -}}
{{- printf "%s-stages" .Release.Name -}}
{{- end -}}

{{/* The ConfigMap of rewards.files (GRPO's --reward_module files). */}}
{{- define "r1-grpo.rewardsConfigMap" -}}
{{- printf "%s-rewards" .Release.Name -}}
{{- end -}}

{{- define "r1-grpo.controllerName" -}}
{{- printf "%s-controller" .Release.Name -}}
{{- end -}}

{{- define "r1-grpo.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-checkpoints" .Release.Name) -}}
{{- end -}}

{{- define "r1-grpo.trainerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (printf "%s-trainer" .Release.Name) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "r1-grpo.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Labels every resource carries; `component` names the part (storage, controller, training...). */}}
{{- define "r1-grpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "r1-grpo.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "r1-grpo.labels" -}}
{{ include "r1-grpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: r1-grpo
app.kubernetes.io/managed-by: {{ .managedBy | default .root.Release.Service }}
helm.sh/chart: {{ include "r1-grpo.chart" .root }}
{{- end -}}

{{/*
Security review (checkov) of a namespaced resource rendered without metadata.namespace: the namespace is
chosen at install time (`helm -n`, `kubectl apply -n`), which keeps manifests/ namespace-agnostic.
*/}}
{{- define "r1-grpo.checkovNamespaceSkip" -}}
checkov.io/skip-namespace: CKV_K8S_21=Namespace-agnostic on purpose, the namespace is chosen at install time (helm -n or kubectl -n)
{{- end -}}

{{/* The stage names in contract order (trainer.contract.stages.STAGES), as a JSON list. */}}
{{- define "r1-grpo.stageNames" -}}
{{- toJson (list "prepare" "sft" "grpo" "eval") -}}
{{- end -}}

{{/* Security review (checkov) of the image reference, only while the values leave these checks failing. */}}
{{- define "r1-grpo.checkovImageSkips" -}}
{{- if not .Values.image.digest }}
checkov.io/skip-digest: CKV_K8S_43=image.digest pins the image when set; the default tag is the chart appVersion, a release tag CI pushes once
{{- end }}
{{- if ne .Values.image.pullPolicy "Always" }}
checkov.io/skip-pull-policy: CKV_K8S_15=IfNotPresent on purpose, every pod would re-pull the multi-GB image; deploy a release or sha tag, or set image.digest
{{- end }}
{{- end -}}

{{/*
Checks the schema cannot express (it cannot compare two values). Called by every template, so
`helm template` fails with the same message whichever file renders first.
*/}}
{{- define "r1-grpo.validate" -}}
{{- $v := .Values -}}
{{- if gt (len .Release.Name) 40 -}}
{{- fail (printf "release name %q is %d characters; at most 40 fit: PyTorchJob pods and Services are named <release>-<stage>-<attempt>-worker-<index> and must stay within 63 characters" .Release.Name (len .Release.Name)) -}}
{{- end -}}
{{- range $name := include "r1-grpo.stageNames" . | fromJsonArray -}}
{{- $stage := index $v.stages $name -}}
{{- if $stage.enabled -}}
{{- $gpu := int (($stage.resources | default dict).gpu | default 0) -}}
{{- if and (eq $v.jobApi "trainjob") (not (has ($stage.restartPolicy | default "Never") (list "Never" "OnFailure"))) -}}
{{- fail (printf "stages.%s.restartPolicy %s works only with jobApi pytorchjob: a TrainJob's pods are Job pods (Never or OnFailure)" $name $stage.restartPolicy) -}}
{{- end -}}
{{- if and (gt $gpu 0) (not (kindIs "invalid" $stage.nprocPerNode)) (ne (int $stage.nprocPerNode) $gpu) -}}
{{- fail (printf "stages.%s.nprocPerNode (%d) must equal stages.%s.resources.gpu (%d): torchrun starts one process per GPU; leave nprocPerNode null to follow the GPU count" $name (int $stage.nprocPerNode) $name $gpu) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- include "r1-grpo.validateModelClaim" . -}}
{{- $model := $v.model.nameOrPath | default "" -}}
{{- if and ($v.stages.prepare | default dict).enabled (not (include "r1-grpo.isHubId" $model)) -}}
{{- fail (printf "model.nameOrPath %q is not a hub id (org/name): stages.prepare downloads the base model from the hub; disable it for a model on the volume" $model) -}}
{{- end -}}
{{- if and (not $v.model.existingClaim) (hasPrefix "/" $model) (not (hasPrefix (printf "%s/" $v.storage.mountPath) $model)) -}}
{{- fail (printf "model.nameOrPath %q is a path outside storage.mountPath %q: the training pods mount only the checkpoint volume, so a local model must live on it (or on a weights volume set as model.existingClaim)" $model $v.storage.mountPath) -}}
{{- end -}}
{{- end -}}
