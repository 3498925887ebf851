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
