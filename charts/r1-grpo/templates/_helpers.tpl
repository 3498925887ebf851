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

{{/* Security review (checkov) of the image reference, only while the values leave these checks failing. */}}
{{- define "r1-grpo.checkovImageSkips" -}}
{{- if not .Values.image.digest }}
checkov.io/skip-digest: CKV_K8S_43=image.digest pins the image when set; the default tag is the chart appVersion, a release tag CI pushes once
{{- end }}
{{- if ne .Values.image.pullPolicy "Always" }}
checkov.io/skip-pull-policy: CKV_K8S_15=IfNotPresent on purpose, every pod would re-pull the multi-GB image; deploy a release or sha tag, or set image.digest
{{- end }}
{{- end -}}

{{/* The stages that run, in contract order, as a JSON list (sft, grpo, eval). */}}
{{- define "r1-grpo.enabledStages" -}}
{{- $out := list -}}
{{- range $name := list "sft" "grpo" "eval" -}}
{{- if (index $.Values.stages $name).enabled -}}
{{- $out = append $out $name -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "r1-grpo.outputDir" -}}
{{- printf "%s/%s/%s" .root.Values.storage.mountPath .root.Release.Name .stage -}}
{{- end -}}

{{/*
The model a stage starts from: sft from model.nameOrPath; grpo from sft's output when sft runs;
eval from the last enabled training stage (grpo, else sft), else model.nameOrPath.
*/}}
{{- define "r1-grpo.modelFrom" -}}
{{- $v := .root.Values -}}
{{- $from := $v.model.nameOrPath | default "" -}}
{{- if and (eq .stage "grpo") $v.stages.sft.enabled -}}
{{- $from = include "r1-grpo.outputDir" (dict "root" .root "stage" "sft") -}}
{{- else if eq .stage "eval" -}}
{{- if $v.stages.grpo.enabled -}}
{{- $from = include "r1-grpo.outputDir" (dict "root" .root "stage" "grpo") -}}
{{- else if $v.stages.sft.enabled -}}
{{- $from = include "r1-grpo.outputDir" (dict "root" .root "stage" "sft") -}}
{{- end -}}
{{- end -}}
{{- $from -}}
{{- end -}}

{{/*
One CLI value, as docs/contract.md renders it: booleans true/false; numbers as integers when whole
(Helm reads every number of a values file as float64, and 1e+06 is not what a user wrote), otherwise in
Go's shortest form (2e-05, 0.7); strings as they are.
*/}}
{{- define "r1-grpo.cliValue" -}}
{{- if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if kindIs "float64" . -}}
{{- if and (eq . (floor .)) (lt . 1e15) (gt . -1e15) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
The stage's CLI flags (JSON list): dataset flags from .Values.dataset and report_to (wandb when
wandb.enabled, else jsonl), then the stage's args map on top (a null there drops the flag), then the
chart-owned model_name_or_path and output_dir. Keys are sorted (Go templates range over maps in key
order), `--key value`, lists as repeated values: the same list trainer.contract.stages.args_to_cli makes.
*/}}
{{- define "r1-grpo.stageFlags" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $args := dict "dataset_name" $v.dataset.name -}}
{{- with $v.dataset.config }}{{ $_ := set $args "dataset_config" . }}{{ end -}}
{{- with $v.dataset.trainSplit }}{{ $_ := set $args "dataset_train_split" . }}{{ end -}}
{{- with $v.dataset.testSplit }}{{ $_ := set $args "dataset_test_split" . }}{{ end -}}
{{- $_ := set $args "report_to" (ternary "wandb" "jsonl" (eq $v.wandb.enabled true)) -}}
{{- range $k, $val := ($stage.args | default dict) -}}
{{- $_ := set $args $k $val -}}
{{- end -}}
{{- $_ := set $args "model_name_or_path" (include "r1-grpo.modelFrom" .) -}}
{{- $_ := set $args "output_dir" (include "r1-grpo.outputDir" .) -}}
{{- $out := list -}}
{{- range $k, $val := $args -}}
{{- if not (kindIs "invalid" $val) -}}
{{- $out = append $out (printf "--%s" $k) -}}
{{- if kindIs "slice" $val -}}
{{- range $item := $val -}}
{{- $out = append $out (include "r1-grpo.cliValue" $item) -}}
{{- end -}}
{{- else -}}
{{- $out = append $out (include "r1-grpo.cliValue" $val) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Processes per pod: stages.<s>.nprocPerNode, else the GPU count, else 1. */}}
{{- define "r1-grpo.nprocPerNode" -}}
{{- $stage := index .root.Values.stages .stage -}}
{{- $gpu := int (($stage.resources | default dict).gpu | default 0) -}}
{{- if not (kindIs "invalid" $stage.nprocPerNode) -}}
{{- int $stage.nprocPerNode -}}
{{- else if gt $gpu 0 -}}
{{- $gpu -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* A placement key of a stage: the stage's own value when it sets the key, else the global one. */}}
{{- define "r1-grpo.placement" -}}
{{- $stage := index .root.Values.stages .stage -}}
{{- $own := $stage.placement | default dict -}}
{{- $global := .root.Values.placement | default dict -}}
{{- $out := dict -}}
{{- range $key := list "nodeSelector" "tolerations" "affinity" "priorityClassName" "schedulerName" -}}
{{- if hasKey $own $key -}}
{{- $_ := set $out $key (index $own $key) -}}
{{- else if hasKey $global $key -}}
{{- $_ := set $out $key (index $global $key) -}}
{{- end -}}
{{- end -}}
{{- if and .root.Values.volcano.enabled (not $out.schedulerName) -}}
{{- $_ := set $out "schedulerName" "volcano" -}}
{{- end -}}
{{- toJson $out -}}
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
{{- range $name := list "sft" "grpo" "eval" -}}
{{- $stage := index $v.stages $name -}}
{{- if $stage.enabled -}}
{{- $gpu := int (($stage.resources | default dict).gpu | default 0) -}}
{{- if and (gt $gpu 0) (not (kindIs "invalid" $stage.nprocPerNode)) (ne (int $stage.nprocPerNode) $gpu) -}}
{{- fail (printf "stages.%s.nprocPerNode (%d) must equal stages.%s.resources.gpu (%d): torchrun starts one process per GPU; leave nprocPerNode null to follow the GPU count" $name (int $stage.nprocPerNode) $name $gpu) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $model := $v.model.nameOrPath | default "" -}}
{{- if and (hasPrefix "/" $model) (not (hasPrefix (printf "%s/" $v.storage.mountPath) $model)) -}}
{{- fail (printf "model.nameOrPath %q is a path outside storage.mountPath %q: the training pods mount only the checkpoint volume, so a local model must live on it" $model $v.storage.mountPath) -}}
{{- end -}}
{{- end -}}

{{/* Environment of a training container (global NCCL/torch defaults, caches, wandb, hub token, stage env). */}}
{{- define "r1-grpo.trainingEnv" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
{{- if $v.hub.cacheOnVolume }}
- name: HF_HOME
  value: {{ printf "%s/.cache/huggingface" $v.storage.mountPath | quote }}
{{- end }}
{{- if $v.hub.existingSecret }}
# The hub token is a mounted file (huggingface_hub reads HF_TOKEN_PATH), not an environment variable.
- name: HF_TOKEN_PATH
  value: /var/run/secrets/huggingface/token
{{- end }}
{{- if $v.wandb.enabled }}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.wandb.existingSecret | quote }}
      key: {{ $v.wandb.secretKey | quote }}
- name: WANDB_PROJECT
  value: {{ $v.wandb.project | quote }}
{{- with $v.wandb.entity }}
- name: WANDB_ENTITY
  value: {{ . | quote }}
{{- end }}
- name: WANDB_RUN_GROUP
  value: {{ .root.Release.Name | quote }}
- name: WANDB_JOB_TYPE
  value: {{ .stage | quote }}
- name: WANDB_DIR
  value: /tmp
{{- else }}
- name: WANDB_MODE
  value: disabled
{{- end }}
{{- range $name, $value := $v.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with $stage.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod template of one replica type of a stage's PyTorchJob. */}}
{{- define "r1-grpo.trainingPodTemplate" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $res := $stage.resources | default dict -}}
{{- $gpu := int ($res.gpu | default 0) -}}
{{- $placement := include "r1-grpo.placement" . | fromJson -}}
{{- $module := get (dict "sft" "trainer.sft" "grpo" "trainer.grpo" "eval" "trainer.evaluate") .stage -}}
metadata:
  labels:
    {{- include "r1-grpo.selectorLabels" (dict "root" .root "component" "training") | nindent 4 }}
    r1-grpo.io/stage: {{ .stage }}
  annotations:
    # Security review (checkov): checks that do not apply to a batch training pod.
    checkov.io/skip-liveness: CKV_K8S_8=A batch training process has no endpoint to probe for liveness; the operator restarts it on exit
    checkov.io/skip-readiness: CKV_K8S_9=A batch training process serves nothing, so there is no readiness to probe
    {{- include "r1-grpo.checkovImageSkips" .root | nindent 4 }}
    {{- include "r1-grpo.checkovNamespaceSkip" .root | nindent 4 }}
    {{- if $v.wandb.enabled }}
    checkov.io/skip-secret-env: CKV_K8S_35=wandb reads its API key only from WANDB_API_KEY or a netrc file; the key comes from the existing Secret wandb.existingSecret and never appears in values or manifests
    {{- end }}
spec:
  serviceAccountName: {{ include "r1-grpo.trainerServiceAccountName" .root }}
  # Training never calls the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $placement.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with $placement.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $placement.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $placement.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $placement.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: pytorch
      image: {{ include "r1-grpo.image" .root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      # The root filesystem is read-only: anything written relative to the working directory goes to /tmp.
      workingDir: /tmp
      # torchrun takes the layout from the variables the training operator sets in every pod:
      # PET_NNODES (replicas), PET_NPROC_PER_NODE (spec.nprocPerNode), PET_NODE_RANK (0 = Master),
      # MASTER_ADDR / MASTER_PORT (the Master's Service and the pytorchjob-port below).
      command:
        - torchrun
      args:
        - --nnodes=$(PET_NNODES)
        - --nproc-per-node=$(PET_NPROC_PER_NODE)
        - --node-rank=$(PET_NODE_RANK)
        - --master-addr=$(MASTER_ADDR)
        - --master-port=$(MASTER_PORT)
        - --module
        - {{ $module }}
        {{- range $flag := include "r1-grpo.stageFlags" . | fromJsonArray }}
        - {{ $flag | toJson }}
        {{- end }}
      ports:
        - name: pytorchjob-port
          containerPort: 23456
          protocol: TCP
      env:
        {{- include "r1-grpo.trainingEnv" . | nindent 8 }}
      resources:
        requests:
          cpu: {{ $res.cpu | default "4" | quote }}
          memory: {{ $res.memory | default "16Gi" | quote }}
          {{- with $res.ephemeralStorage }}
          ephemeral-storage: {{ . | quote }}
          {{- end }}
          {{- if gt $gpu 0 }}
          {{ $v.gpuResourceName }}: {{ $gpu | quote }}
          {{- end }}
        limits:
          cpu: {{ $res.cpu | default "4" | quote }}
          memory: {{ $res.memory | default "16Gi" | quote }}
          {{- with $res.ephemeralStorage }}
          ephemeral-storage: {{ . | quote }}
          {{- end }}
          {{- if gt $gpu 0 }}
          {{ $v.gpuResourceName }}: {{ $gpu | quote }}
          {{- end }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: checkpoints
          mountPath: {{ $v.storage.mountPath }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if $v.hub.existingSecret }}
        - name: hub-token
          mountPath: /var/run/secrets/huggingface
          readOnly: true
        {{- end }}
  volumes:
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ include "r1-grpo.claimName" .root }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize | quote }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.tmpSize | quote }}
    {{- with $v.hub.existingSecret }}
    - name: hub-token
      secret:
        secretName: {{ . }}
        items:
          - key: {{ $v.hub.secretKey }}
            path: token
        # 0440: readable by the pod's group (fsGroup) only.
        defaultMode: 288
    {{- end }}
{{- end -}}

{{/* The complete kubeflow.org/v1 PyTorchJob of a stage, attempt 1 (the controller renames later attempts). */}}
{{- define "r1-grpo.pytorchJob" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $nodes := int ($stage.nodes | default 1) -}}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ printf "%s-%s-1" .root.Release.Name .stage }}
  labels:
    {{- include "r1-grpo.labels" (dict "root" .root "component" "training" "managedBy" "r1-grpo-controller") | nindent 4 }}
    r1-grpo.io/stage: {{ .stage }}
    r1-grpo.io/attempt: "1"
    {{- if $v.kueue.enabled }}
    kueue.x-k8s.io/queue-name: {{ $v.kueue.queueName }}
    {{- with $v.kueue.priorityClass }}
    kueue.x-k8s.io/priority-class: {{ . }}
    {{- end }}
    {{- end }}
spec:
  nprocPerNode: {{ include "r1-grpo.nprocPerNode" . | quote }}
  runPolicy:
    backoffLimit: {{ $stage.backoffLimit | default 0 | int }}
    # Keep finished pods so their logs stay readable (the controller reads a failed pod's log).
    cleanPodPolicy: None
    {{- if $v.volcano.enabled }}
    schedulingPolicy:
      # Gang scheduling: start the stage only when all its pods can run.
      minAvailable: {{ $nodes }}
      {{- with $v.volcano.queue }}
      queue: {{ . }}
      {{- end }}
    {{- end }}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: {{ $stage.restartPolicy | default "OnFailure" }}
      template:
        {{- include "r1-grpo.trainingPodTemplate" . | nindent 8 }}
    {{- if gt $nodes 1 }}
    Worker:
      replicas: {{ sub $nodes 1 }}
      restartPolicy: {{ $stage.restartPolicy | default "OnFailure" }}
      template:
        {{- include "r1-grpo.trainingPodTemplate" . | nindent 8 }}
    {{- end }}
{{- end -}}

{{/* pipeline.yaml of the stages ConfigMap (docs/contract.md). */}}
{{- define "r1-grpo.pipeline" -}}
{{- $stages := list -}}
{{- range $name := include "r1-grpo.enabledStages" . | fromJsonArray -}}
{{- $ctx := dict "root" $ "stage" $name -}}
{{- $stages = append $stages (dict "name" $name "outputDir" (include "r1-grpo.outputDir" $ctx) "modelFrom" (include "r1-grpo.modelFrom" $ctx) "job" (printf "%s.yaml" $name)) -}}
{{- end -}}
{{- toYaml (dict "release" .Release.Name "mountPath" .Values.storage.mountPath "stages" $stages) -}}
{{- end -}}
