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
