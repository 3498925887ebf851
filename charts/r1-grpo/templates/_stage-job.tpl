{{/*
The stage PyTorchJob and what it is made of: output folders, the lineage rule (modelFrom), the CLI flag
renderer, torchrun layout, placement, environment, the pod template, the job, and pipeline.yaml of the
stages ConfigMap (docs/contract.md). Names, labels, the image and `validate` are in _helpers.tpl.

Three facts here are copies of trainer/contract/, because Helm cannot call Python: the stage->module map
(stages.STAGE_MODULES), the lineage rule (stages.model_sources) and the prepare stage's hand-off
(prepared.py: which dataset entries are hub ids, where they are prepared, the offline environment).
tests/test_chart.py renders every subset of enabled stages and holds the copies equal to the Python ones.
*/}}

{{/* The stage -> module map (a copy of trainer.contract.stages.STAGE_MODULES), as a JSON map. */}}
{{- define "r1-grpo.stageModules" -}}
{{- toJson (dict "prepare" "trainer.prepare" "sft" "trainer.sft" "grpo" "trainer.grpo" "eval" "trainer.evaluate") -}}
{{- end -}}

{{/* The stages that run, in contract order, as a JSON list (prepare, sft, grpo, eval). */}}
{{- define "r1-grpo.enabledStages" -}}
{{- $out := list -}}
{{- range $name := include "r1-grpo.stageNames" . | fromJsonArray -}}
{{- if (index $.Values.stages $name | default dict).enabled -}}
{{- $out = append $out $name -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "r1-grpo.outputDir" -}}
{{- printf "%s/%s/%s" .root.Values.storage.mountPath .root.Release.Name .stage -}}
{{- end -}}

{{/*
The model a stage starts from (a copy of trainer.contract.stages.model_sources): the output folder of the
last enabled model stage before it (prepare: the downloaded base model, sft, grpo), else the base model
(r1-grpo.baseModel: model.nameOrPath, or the model.existingClaim mount).
*/}}
{{- define "r1-grpo.modelFrom" -}}
{{- $from := include "r1-grpo.baseModel" .root -}}
{{- $before := true -}}
{{- range $name := list "prepare" "sft" "grpo" -}}
{{- if eq $name $.stage -}}
{{- $before = false -}}
{{- end -}}
{{- if and $before (index $.root.Values.stages $name | default dict).enabled -}}
{{- $from = include "r1-grpo.outputDir" (dict "root" $.root "stage" $name) -}}
{{- end -}}
{{- end -}}
{{- $from -}}
{{- end -}}

{{/* "true" when a dataset entry or model names a hub repository (a copy of trainer.contract.prepared.is_hub_id). */}}
{{- define "r1-grpo.isHubId" -}}
{{- if and (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$" .) (not (regexMatch "(?i)\\.(jsonl|json|parquet)$" .)) -}}
true
{{- end -}}
{{- end -}}

{{/* The entries of a --dataset_name value as a JSON list of [name, ":<weight>" or ""] (prepared._entries). */}}
{{- define "r1-grpo.datasetEntries" -}}
{{- $out := list -}}
{{- range $part := splitList "," (toString .) -}}
{{- $part = trim $part -}}
{{- if $part -}}
{{- $re := "^(.+?)(:(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+))$" -}}
{{- if regexMatch $re $part -}}
{{- $out = append $out (list (regexReplaceAll $re $part "${1}" | trim) (regexReplaceAll $re $part "${2}")) -}}
{{- else -}}
{{- $out = append $out (list $part "") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
A later stage's --dataset_name with every hub entry replaced by its prepared folder
(<prepare>/datasets/<hub id>, a source's own @config kept; a copy of trainer.contract.prepared.rewrite_dataset_name).
*/}}
{{- define "r1-grpo.preparedDatasetName" -}}
{{- $prepare := include "r1-grpo.outputDir" (dict "root" .root "stage" "prepare") -}}
{{- $out := list -}}
{{- range $entry := include "r1-grpo.datasetEntries" .spec | fromJsonArray -}}
{{- $name := index $entry 0 -}}
{{- $base := regexReplaceAll "@[^@]+$" $name "" -}}
{{- if and $base (include "r1-grpo.isHubId" $base) -}}
{{- $name = printf "%s/datasets/%s%s" $prepare $base (trimPrefix $base $name) -}}
{{- end -}}
{{- $out = append $out (printf "%s%s" $name (index $entry 1)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/*
The prepare stage's --dataset_name: the hub datasets of its own args.dataset_name and of every later enabled
stage's dataset (its args.dataset_name, else dataset.name), each repository once, without @config
(prepared.hub_datasets).
*/}}
{{- define "r1-grpo.prepareDatasets" -}}
{{- $v := .root.Values -}}
{{- $specs := list (($v.stages.prepare.args | default dict).dataset_name | default "") -}}
{{- range $name := include "r1-grpo.enabledStages" .root | fromJsonArray -}}
{{- if ne $name "prepare" -}}
{{- $args := (index $v.stages $name).args | default dict -}}
{{- $specs = append $specs (ternary $args.dataset_name $v.dataset.name (hasKey $args "dataset_name") | default "") -}}
{{- end -}}
{{- end -}}
{{- $seen := list -}}
{{- range $spec := $specs -}}
{{- range $entry := include "r1-grpo.datasetEntries" $spec | fromJsonArray -}}
{{- $name := regexReplaceAll "@[^@]+$" (index $entry 0) "" -}}
{{- if and $name (include "r1-grpo.isHubId" $name) (not (has $name $seen)) -}}
{{- $seen = append $seen $name -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "," $seen -}}
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
chart-owned model_name_or_path and output_dir. With stages.prepare enabled, a later stage's hub datasets
are read from prepare's folder; prepare itself gets only its args and the hub datasets to download. Keys
are sorted (Go templates range over maps in key order), `--key value`, lists as repeated values: the same
list trainer.contract.stages.args_to_cli makes.
*/}}
{{- define "r1-grpo.stageFlags" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $args := dict -}}
{{- if ne .stage "prepare" -}}
{{- $_ := set $args "dataset_name" $v.dataset.name -}}
{{- with $v.dataset.config }}{{ $_ := set $args "dataset_config" . }}{{ end -}}
{{- with $v.dataset.trainSplit }}{{ $_ := set $args "dataset_train_split" . }}{{ end -}}
{{- with $v.dataset.testSplit }}{{ $_ := set $args "dataset_test_split" . }}{{ end -}}
{{- $_ := set $args "report_to" (ternary "wandb" "jsonl" (eq $v.wandb.enabled true)) -}}
{{- end -}}
{{- range $k, $val := ($stage.args | default dict) -}}
{{- $_ := set $args $k $val -}}
{{- end -}}
{{- if eq .stage "prepare" -}}
{{- $_ := set $args "dataset_name" (include "r1-grpo.prepareDatasets" . | default nil) -}}
{{- else if and ($v.stages.prepare | default dict).enabled (not (kindIs "invalid" $args.dataset_name)) -}}
{{- $_ := set $args "dataset_name" (include "r1-grpo.preparedDatasetName" (dict "root" .root "spec" $args.dataset_name)) -}}
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

{{/* Seconds between SIGTERM and SIGKILL of a stage's pods: the stage's own value when set, else the global one. */}}
{{- define "r1-grpo.gracePeriod" -}}
{{- $stage := index .root.Values.stages .stage -}}
{{- if not (kindIs "invalid" $stage.terminationGracePeriodSeconds) -}}
{{- int $stage.terminationGracePeriodSeconds -}}
{{- else if not (kindIs "invalid" .root.Values.terminationGracePeriodSeconds) -}}
{{- int .root.Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/*
The training container's securityContext: containerSecurityContext, plus capabilities.add [IPC_LOCK] when
ipcLock is set (drop ALL stays).
*/}}
{{- define "r1-grpo.trainingSecurityContext" -}}
{{- $ctx := deepCopy .Values.containerSecurityContext -}}
{{- if .Values.ipcLock -}}
{{- $caps := $ctx.capabilities | default dict -}}
{{- $add := $caps.add | default list -}}
{{- if not (has "IPC_LOCK" $add) -}}
{{- $add = append $add "IPC_LOCK" -}}
{{- end -}}
{{- $_ := set $caps "add" $add -}}
{{- $_ := set $ctx "capabilities" $caps -}}
{{- end -}}
{{- toYaml $ctx -}}
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
{{- if and ($v.stages.prepare | default dict).enabled (ne .stage "prepare") }}
# stages.prepare downloaded the model and datasets: nothing after it may reach for the hub.
- name: HF_HUB_OFFLINE
  value: "1"
- name: HF_DATASETS_OFFLINE
  value: "1"
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

{{/*
What differs between the job APIs inside the stage pod (jobApi): the training container's name (the
training operator finds container `pytorch`, the Trainer's torch plugin container `node` of replicated job
`node`), the variables torchrun's rendezvous address comes from (the operator sets MASTER_ADDR/MASTER_PORT,
the Trainer PET_MASTER_ADDR/PET_MASTER_PORT; both set PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK) and that
port (23456 and 29500, their defaults). As a JSON map.
*/}}
{{- define "r1-grpo.jobApiPod" -}}
{{- if eq .Values.jobApi "trainjob" -}}
{{- toJson (dict "container" "node" "addr" "PET_MASTER_ADDR" "port" "PET_MASTER_PORT" "portName" "torchrun" "portNumber" 29500) -}}
{{- else -}}
{{- toJson (dict "container" "pytorch" "addr" "MASTER_ADDR" "port" "MASTER_PORT" "portName" "pytorchjob-port" "portNumber" 23456) -}}
{{- end -}}
{{- end -}}

{{/* Pod template of a stage: every pod of its PyTorchJob or TrainJob (one partial for both job APIs). */}}
{{- define "r1-grpo.trainingPodTemplate" -}}
{{- $v := .root.Values -}}
{{- $api := include "r1-grpo.jobApiPod" .root | fromJson -}}
{{- $stage := index $v.stages .stage -}}
{{- $res := $stage.resources | default dict -}}
{{- $gpu := int ($res.gpu | default 0) -}}
{{- $extra := $res.extra | default dict -}}
{{- if hasKey $extra $v.gpuResourceName -}}
{{- fail (printf "stages.%s.resources.extra: %s is requested by stages.%s.resources.gpu, not here" .stage $v.gpuResourceName .stage) -}}
{{- end -}}
{{- $grace := include "r1-grpo.gracePeriod" . -}}
{{- $placement := include "r1-grpo.placement" . | fromJson -}}
{{- $module := get (include "r1-grpo.stageModules" . | fromJson) .stage -}}
{{- $extras := include "r1-grpo.stagePodExtras" . | fromJson -}}
metadata:
  labels:
    {{- include "r1-grpo.selectorLabels" (dict "root" .root "component" "training") | nindent 4 }}
    r1-grpo.io/stage: {{ .stage }}
    {{- with $extras.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Security review (checkov): checks that do not apply to a batch training pod.
    checkov.io/skip-liveness: CKV_K8S_8=A batch training process has no endpoint to probe for liveness; the operator restarts it on exit
    checkov.io/skip-readiness: CKV_K8S_9=A batch training process serves nothing, so there is no readiness to probe
    {{- include "r1-grpo.checkovImageSkips" .root | nindent 4 }}
    {{- include "r1-grpo.checkovNamespaceSkip" .root | nindent 4 }}
    {{- if $v.wandb.enabled }}
    checkov.io/skip-secret-env: CKV_K8S_35=wandb reads its API key only from WANDB_API_KEY or a netrc file; the key comes from the existing Secret wandb.existingSecret and never appears in values or manifests
    {{- end }}
    {{- with $extras.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "r1-grpo.trainerServiceAccountName" .root }}
  # Training never calls the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $grace }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- if $extras.hostNetwork }}
  hostNetwork: true
  {{- end }}
  {{- with $extras.dnsPolicy }}
  dnsPolicy: {{ . }}
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
    - name: {{ $api.container }}
      image: {{ include "r1-grpo.image" .root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      # The root filesystem is read-only: anything written relative to the working directory goes to /tmp.
      workingDir: /tmp
      # `r1-grpo launch` runs torchrun and, on SIGTERM, gives the trainers the pod's grace period to save
      # (torchrun alone kills them 30 s after SIGTERM; trainer/launch.py). torchrun takes the layout from
      # the variables the job's operator sets in every pod: PET_NNODES (nodes), PET_NPROC_PER_NODE,
      # PET_NODE_RANK (0 = the first node), the first node's address and the port below (r1-grpo.jobApiPod).
      command:
        - r1-grpo
        - launch
        - --termination-grace-period-seconds={{ $grace | default 30 }}
        - --
        - torchrun
      args:
        - --nnodes=$(PET_NNODES)
        - --nproc-per-node=$(PET_NPROC_PER_NODE)
        - --node-rank=$(PET_NODE_RANK)
        - --master-addr=$({{ $api.addr }})
        - --master-port=$({{ $api.port }})
        - --module
        - {{ $module }}
        {{- range $flag := include "r1-grpo.stageFlags" . | fromJsonArray }}
        - {{ $flag | toJson }}
        {{- end }}
      ports:
        - name: {{ $api.portName }}
          containerPort: {{ $api.portNumber }}
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
          {{- range $name, $count := $extra }}
          {{ $name }}: {{ include "r1-grpo.cliValue" $count | quote }}
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
          {{- range $name, $count := $extra }}
          {{ $name }}: {{ include "r1-grpo.cliValue" $count | quote }}
          {{- end }}
      securityContext:
        {{- include "r1-grpo.trainingSecurityContext" .root | nindent 8 }}
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
        {{- if $v.rewards.files }}
        - name: rewards
          mountPath: {{ $v.rewards.mountPath }}
          readOnly: true
        {{- end }}
        {{- with $extras.volumeMounts }}
        {{- toYaml . | nindent 8 }}
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
    {{- if $v.rewards.files }}
    - name: rewards
      configMap:
        name: {{ include "r1-grpo.rewardsConfigMap" .root }}
        # 0444: code, read by the trainer (UID 10001), never executed as a file.
        defaultMode: 292
    {{- end }}
    {{- with $extras.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The complete kubeflow.org/v1 PyTorchJob of a stage, attempt 1 (the controller renames later attempts). */}}
{{- define "r1-grpo.pytorchJob" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $nodes := int ($stage.nodes | default 1) -}}
{{- $restart := $stage.restartPolicy | default "Never" -}}
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
    {{- if ne $restart "Never" }}
    # In-place restarts before the job fails (restartPolicy Never has none; the controller retries stages).
    backoffLimit: {{ $stage.backoffLimit | default 0 | int }}
    {{- end }}
    # When the job has finished: delete the pods still running (a Worker, a crash-looping OnFailure pod),
    # so no old trainer writes on into the stage's folder once the controller starts the next attempt,
    # and keep the failed ones, whose logs the controller reads (values.yaml: stages).
    cleanPodPolicy: Running
    {{- if $v.volcano.enabled }}
    schedulingPolicy:
      # Gang scheduling: start the stage only when all its pods can run.
      minAvailable: {{ $nodes }}
      {{- with $v.volcano.queue }}
      queue: {{ . }}
      {{- end }}
      {{- with (include "r1-grpo.placement" . | fromJson).priorityClassName }}
      # The PodGroup's priority (Volcano orders and preempts gangs by it, not by the pods' priority).
      priorityClass: {{ . }}
      {{- end }}
    {{- end }}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: {{ $restart }}
      template:
        {{- include "r1-grpo.trainingPodTemplate" . | nindent 8 }}
    {{- if gt $nodes 1 }}
    Worker:
      replicas: {{ sub $nodes 1 }}
      restartPolicy: {{ $restart }}
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

{{/*
The TrainingRuntime the chart ships for a stage (jobApi trainjob, no trainJob.clusterTrainingRuntime): the
Trainer's torch policy around one replicated job `node` whose pods are the stage pod template above, so a
TrainJob runs exactly the pods a PyTorchJob would. Job-level restarts follow stages.<s>.restartPolicy (Never
or OnFailure with backoffLimit); JobSet never restarts the job as a whole (the controller retries stages).
*/}}
{{- define "r1-grpo.trainingRuntime" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $restart := $stage.restartPolicy | default "Never" -}}
{{- $pod := include "r1-grpo.trainingPodTemplate" . | fromYaml -}}
{{- $_ := set $pod.spec "restartPolicy" $restart -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainingRuntime
metadata:
  name: {{ printf "%s-%s" .root.Release.Name .stage }}
  labels:
    {{- include "r1-grpo.labels" (dict "root" .root "component" "training") | nindent 4 }}
    r1-grpo.io/stage: {{ .stage }}
    trainer.kubeflow.org/framework: torch
spec:
  mlPolicy:
    numNodes: {{ int ($stage.nodes | default 1) }}
    torch: {}
  template:
    spec:
      failurePolicy:
        maxRestarts: 0
      replicatedJobs:
        - name: node
          template:
            metadata:
              labels:
                trainer.kubeflow.org/trainjob-ancestor-step: trainer
            spec:
              backoffLimit: {{ ternary 0 ($stage.backoffLimit | default 0 | int) (eq $restart "Never") }}
              template:
                {{- toYaml $pod | nindent 16 }}
{{- end -}}

{{/*
The complete trainer.kubeflow.org/v1alpha1 TrainJob of a stage, attempt 1 (the controller renames later
attempts). Against the chart's TrainingRuntime <release>-<stage> it sets the layout and repeats the pods'
command line; against a ClusterTrainingRuntime the user names (trainJob.clusterTrainingRuntime) it carries
the stage pod template's container (image, command, args, env, resources) in spec.trainer and the rest of the pod (labels, service
account, security contexts, volumes, placement, grace period) as a runtime patch: the same pod, taken from
the same partial. Fields a runtime patch cannot set (priorityClassName, schedulerName, enableServiceLinks,
automountServiceAccountToken, ports) are then the ClusterTrainingRuntime's.
*/}}
{{- define "r1-grpo.trainJob" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $cluster := $v.trainJob.clusterTrainingRuntime -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
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
  runtimeRef:
    apiGroup: trainer.kubeflow.org
    {{- if $cluster }}
    kind: ClusterTrainingRuntime
    name: {{ $cluster }}
    {{- else }}
    kind: TrainingRuntime
    name: {{ printf "%s-%s" .root.Release.Name .stage }}
    {{- end }}
  {{- $pod := include "r1-grpo.trainingPodTemplate" . | fromYaml }}
  {{- $c := index $pod.spec.containers 0 }}
  trainer:
    numNodes: {{ int ($stage.nodes | default 1) }}
    numProcPerNode: {{ include "r1-grpo.nprocPerNode" . }}
    # The stage's command line, as in its pods (the job says what it runs; the controller checks the flags).
    command:
      {{- toYaml $c.command | nindent 6 }}
    args:
      {{- toYaml $c.args | nindent 6 }}
    {{- if $cluster }}
    image: {{ $c.image }}
    env:
      {{- toYaml $c.env | nindent 6 }}
    resourcesPerNode:
      {{- toYaml $c.resources | nindent 6 }}
  runtimePatches:
    - manager: r1-grpo.io/chart
      trainingRuntimeSpec:
        template:
          spec:
            replicatedJobs:
              - name: node
                template:
                  spec:
                    template:
                      metadata:
                        {{- toYaml (pick $pod.metadata "labels" "annotations") | nindent 24 }}
                      spec:
                        {{- $patch := pick $pod.spec "serviceAccountName" "volumes" "imagePullSecrets" "securityContext" "nodeSelector" "affinity" "tolerations" "terminationGracePeriodSeconds" -}}
                        {{- $_ := set $patch "containers" (list (pick $c "name" "volumeMounts" "securityContext")) }}
                        {{- toYaml $patch | nindent 24 }}
    {{- end }}
{{- end -}}
