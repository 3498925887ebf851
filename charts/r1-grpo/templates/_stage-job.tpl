{{/*
What every stage job is made of: output folders, the lineage rule (modelFrom), the CLI flag renderer,
torchrun layout, placement, environment, the pod template shared by both job APIs, and pipeline.yaml of the
stages ConfigMap (docs/contract.md). The jobs around the pod: _pytorchjob.tpl and _trainjob.tpl; the prepare
stage's hand-off: _prepare.tpl; names, labels, the image and `validate`: _helpers.tpl.

Three facts here are copies of trainer/contract/, because Helm cannot call Python: the stage->module map
(stages.STAGE_MODULES), the lineage rule (stages.model_sources) and the prepare stage's hand-off
(prepared.py: which dataset entries are hub ids, where they are prepared, the offline environment; its
helpers are in _prepare.tpl).
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

{{/* OpenMP threads per training process: the pod's CPUs (stages.<s>.resources.cpu, a quantity such as "32"
or "1500m") over its processes, at least 1; empty without a CPU count. A fixed count oversubscribes small pods
(2 processes x 4 threads on 2 CPUs trained 8x slower) and idles large ones. */}}
{{- define "r1-grpo.ompThreads" -}}
{{- $stage := index .root.Values.stages .stage -}}
{{- $cpu := "" -}}
{{- with ($stage.resources | default dict).cpu -}}{{- $cpu = toString . -}}{{- end -}}
{{- if $cpu -}}
{{- $millis := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $millis = int (trimSuffix "m" $cpu) -}}
{{- else -}}
{{- $millis = int (mulf (float64 $cpu) 1000) -}}
{{- end -}}
{{- max 1 (div $millis (mul 1000 (int (include "r1-grpo.nprocPerNode" .)))) -}}
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
{{- $userThreads := hasKey ($v.env | default dict) "OMP_NUM_THREADS" -}}
{{- range $stage.env }}{{ if eq (toString .name) "OMP_NUM_THREADS" }}{{ $userThreads = true }}{{ end }}{{ end -}}
{{- $threads := include "r1-grpo.ompThreads" . -}}
{{- if and $threads (not $userThreads) }}
# The pod's CPUs over its processes (torchrun alone sets 1); env or the stage's env may set it instead.
- name: OMP_NUM_THREADS
  value: {{ $threads | quote }}
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

{{/* pipeline.yaml of the stages ConfigMap (docs/contract.md). */}}
{{- define "r1-grpo.pipeline" -}}
{{- $stages := list -}}
{{- range $name := include "r1-grpo.enabledStages" . | fromJsonArray -}}
{{- $ctx := dict "root" $ "stage" $name -}}
{{- $stages = append $stages (dict "name" $name "outputDir" (include "r1-grpo.outputDir" $ctx) "modelFrom" (include "r1-grpo.modelFrom" $ctx) "job" (printf "%s.yaml" $name)) -}}
{{- end -}}
{{- toYaml (dict "release" .Release.Name "mountPath" .Values.storage.mountPath "stages" $stages) -}}
{{- end -}}
