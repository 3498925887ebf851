{{/*
The controller Job's spec, and its name: <release>-controller-<first 8 hex digits of the spec's sha256>.
A Job's pod template is immutable, so a `helm upgrade` that changes the spec (image, args, retries,
resources...) must create a new Job: a new name does that, and Helm deletes the Job the new manifest no
longer lists (its pod gets SIGTERM, exits 143). For a moment both controllers may run; that is safe, as
both act on the same cluster state with create-if-absent job names. Release names of at most 40
characters keep the name within 63.
*/}}
{{- define "r1-grpo.controllerJobName" -}}
{{- printf "%s-%s" (include "r1-grpo.controllerName" .) (include "r1-grpo.controllerJobSpec" . | sha256sum | trunc 8) -}}
{{- end -}}

{{- define "r1-grpo.controllerJobSpec" -}}
{{- $v := .Values -}}
# The controller resumes from <release>-status and the cluster state, so restarting it is safe.
backoffLimit: {{ $v.controller.backoffLimit }}
# Exit codes (trainer/controller.py): 1 the run failed (a stage past its retries), 2 bad stage config,
# 3 RBAC forbids a call. Restarting cannot change any of these, so they end the Job at once; a crash
# (4), SIGTERM (143) or an evicted/preempted pod are retried up to backoffLimit.
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: controller
        operator: In
        values: [1, 2, 3]
      # Kubernetes < 1.28 marks onPodConditions as required in its OpenAPI schema; empty means "none".
      onPodConditions: []
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
template:
  metadata:
    labels:
      {{- include "r1-grpo.selectorLabels" (dict "root" . "component" "controller") | nindent 6 }}
      {{- with $v.controller.podLabels }}
      {{- include "r1-grpo.checkReservedKeys" (dict "kind" "labels" "values" . "field" "controller.podLabels") }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $v.controller.podAnnotations }}
    {{- include "r1-grpo.checkReservedKeys" (dict "kind" "annotations" "values" . "field" "controller.podAnnotations") }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    serviceAccountName: {{ include "r1-grpo.controllerName" . }}
    automountServiceAccountToken: true
    enableServiceLinks: false
    restartPolicy: Never  # podFailurePolicy needs it; a new pod resumes from the cluster state
    securityContext:
      {{- toYaml $v.podSecurityContext | nindent 6 }}
    {{- with $v.image.pullSecrets }}
    imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
    {{- end }}
    {{- with $v.controller.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $v.controller.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.controller.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.controller.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: controller
        image: {{ include "r1-grpo.image" . }}
        imagePullPolicy: {{ $v.image.pullPolicy }}
        workingDir: /tmp
        command:
          - r1-grpo
        args:
          - controller
          - --release
          - {{ .Release.Name }}
          - --namespace
          - $(POD_NAMESPACE)
          - --stages-configmap
          - {{ include "r1-grpo.stagesConfigMap" . }}
          - --retries
          - {{ $v.controller.retries | quote }}
          - --keep-checkpoints
          - {{ $v.controller.keepCheckpoints | quote }}
          - --pending-timeout-seconds
          - {{ $v.controller.pendingTimeoutSeconds | quote }}
        env:
          # The namespace comes from the pod itself so the rendered manifests work in any namespace.
          - name: POD_NAMESPACE
            valueFrom:
              fieldRef:
                fieldPath: metadata.namespace
          - name: HOME
            value: /tmp
          - name: PYTHONUNBUFFERED
            value: "1"
        resources:
          {{- toYaml $v.controller.resources | nindent 10 }}
        securityContext:
          {{- toYaml $v.containerSecurityContext | nindent 10 }}
        volumeMounts:
          - name: checkpoints
            mountPath: {{ $v.storage.mountPath }}
          - name: tmp
            mountPath: /tmp
    volumes:
      - name: checkpoints
        persistentVolumeClaim:
          claimName: {{ include "r1-grpo.claimName" . }}
      - name: tmp
        emptyDir:
          sizeLimit: 1Gi
{{- end -}}
