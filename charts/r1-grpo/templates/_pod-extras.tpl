{{/*
Pod escape hatches (podLabels, podAnnotations, extraVolumes, extraVolumeMounts, hostNetwork, dnsPolicy) and
the read-only model volume (model.existingClaim), merged and checked here so that the pod partials only
print the result. Merge rules, global then `stages.<stage>.*`: maps merge (the stage's key wins), lists
append (global entries first), scalars override (a stage's null or missing key inherits the global one).
Keys the chart, the controller, the training operator or Kueue set or select on are reserved: setting one
fails the render naming the key, as a duplicate would be silently dropped or break a selector.
*/}}

{{/* Reserved key prefixes and keys (JSON), shared by the training and controller pods. */}}
{{- define "r1-grpo.reservedPodKeys" -}}
{{- toJson (dict
  "labels" (dict
    "prefixes" (list "r1-grpo.io/" "training.kubeflow.org/" "kueue.x-k8s.io/")
    "keys" (list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component"))
  "annotations" (dict
    "prefixes" (list "r1-grpo.io/" "training.kubeflow.org/" "kueue.x-k8s.io/" "checkov.io/")
    "keys" (list "scheduling.k8s.io/group-name"))) -}}
{{- end -}}

{{/* Fails when a key of .values (a map set at .field) is reserved for .kind (labels or annotations). */}}
{{- define "r1-grpo.checkReservedKeys" -}}
{{- $reserved := index (include "r1-grpo.reservedPodKeys" . | fromJson) .kind -}}
{{- range $key, $_ := .values -}}
{{- $hit := has $key $reserved.keys -}}
{{- range $prefix := $reserved.prefixes -}}
{{- if hasPrefix $prefix $key -}}{{- $hit = true -}}{{- end -}}
{{- end -}}
{{- if $hit -}}
{{- fail (printf "%s: %q is reserved (the chart, its controller, the training operator or Kueue set or select on it; reserved: %s and the keys under %s)" $.field $key (join ", " $reserved.keys) (join ", " $reserved.prefixes)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The base model's path inside the pods when model.existingClaim is set: nameOrPath, else the mount. */}}
{{- define "r1-grpo.baseModel" -}}
{{- $m := .Values.model -}}
{{- if and $m.existingClaim (not $m.nameOrPath) -}}
{{- $m.mountPath -}}
{{- else -}}
{{- $m.nameOrPath | default "" -}}
{{- end -}}
{{- end -}}

{{/* model.existingClaim combinations the schema cannot compare (called by r1-grpo.validate). */}}
{{- define "r1-grpo.validateModelClaim" -}}
{{- $m := .Values.model -}}
{{- $name := $m.nameOrPath | default "" -}}
{{- if and $m.subPath (not $m.existingClaim) -}}
{{- fail (printf "model.subPath %q needs model.existingClaim (the PVC holding the weights)" $m.subPath) -}}
{{- end -}}
{{- if $m.existingClaim -}}
{{- $mount := $m.mountPath -}}
{{- if and $name (ne $name $mount) (not (hasPrefix (printf "%s/" $mount) $name)) -}}
{{- fail (printf "model.nameOrPath %q with model.existingClaim %q: the stages load the model from the read-only mount %s (model.mountPath); set nameOrPath to \"\" (the mount itself) or to a folder under %s/, not a hub id or another path" $name $m.existingClaim $mount $mount) -}}
{{- end -}}
{{- range $taken := list .Values.storage.mountPath "/tmp" "/dev/shm" "/var/run/secrets/huggingface" -}}
{{- if or (eq $mount $taken) (hasPrefix (printf "%s/" $taken) $mount) (hasPrefix (printf "%s/" $mount) $taken) -}}
{{- fail (printf "model.mountPath %q overlaps %s, which the chart mounts itself; pick a separate folder such as /model" $mount $taken) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A stage pod's extras (JSON): labels, annotations, volumes and volumeMounts (the model volume first, then
extraVolumes/extraVolumeMounts), hostNetwork and dnsPolicy (ClusterFirstWithHostNet under hostNetwork unless
set: the pod would otherwise resolve names with the node's resolver and miss the master's Service).
*/}}
{{- define "r1-grpo.stagePodExtras" -}}
{{- $v := .root.Values -}}
{{- $stage := index $v.stages .stage -}}
{{- $at := printf "stages.%s" .stage -}}
{{- include "r1-grpo.checkReservedKeys" (dict "kind" "labels" "values" $v.podLabels "field" "podLabels") -}}
{{- include "r1-grpo.checkReservedKeys" (dict "kind" "labels" "values" $stage.podLabels "field" (printf "%s.podLabels" $at)) -}}
{{- include "r1-grpo.checkReservedKeys" (dict "kind" "annotations" "values" $v.podAnnotations "field" "podAnnotations") -}}
{{- include "r1-grpo.checkReservedKeys" (dict "kind" "annotations" "values" $stage.podAnnotations "field" (printf "%s.podAnnotations" $at)) -}}
{{- $labels := merge (dict) ($stage.podLabels | default dict) ($v.podLabels | default dict) -}}
{{- $annotations := merge (dict) ($stage.podAnnotations | default dict) ($v.podAnnotations | default dict) -}}
{{- /* Volumes and mount paths the chart's own containers already use: names and paths must stay unique. */ -}}
{{- $volumeNames := list "checkpoints" "dshm" "tmp" -}}
{{- $paths := dict $v.storage.mountPath "checkpoints" "/dev/shm" "dshm" "/tmp" "tmp" -}}
{{- if $v.hub.existingSecret -}}
{{- $volumeNames = append $volumeNames "hub-token" -}}
{{- $_ := set $paths "/var/run/secrets/huggingface" "hub-token" -}}
{{- end -}}
{{- if $v.rewards.files -}}
{{- $volumeNames = append $volumeNames "rewards" -}}
{{- $_ := set $paths $v.rewards.mountPath "rewards" -}}
{{- end -}}
{{- $volumes := list -}}
{{- $mounts := list -}}
{{- if and $v.model.existingClaim (eq (include "r1-grpo.modelFrom" .) (include "r1-grpo.baseModel" .root)) -}}
{{- $volumes = append $volumes (dict "name" "model" "persistentVolumeClaim" (dict "claimName" $v.model.existingClaim "readOnly" true)) -}}
{{- $mount := dict "name" "model" "mountPath" $v.model.mountPath "readOnly" true -}}
{{- with $v.model.subPath }}{{ $_ := set $mount "subPath" . }}{{ end -}}
{{- $mounts = append $mounts $mount -}}
{{- $volumeNames = append $volumeNames "model" -}}
{{- $_ := set $paths $v.model.mountPath "model" -}}
{{- end -}}
{{- range $source := list (dict "field" "extraVolumes" "items" $v.extraVolumes) (dict "field" (printf "%s.extraVolumes" $at) "items" $stage.extraVolumes) -}}
{{- range $volume := $source.items | default list -}}
{{- if has $volume.name $volumeNames -}}
{{- fail (printf "%s: volume name %q is already used in the %s pods (the chart's volumes: checkpoints, dshm, tmp, hub-token, rewards, model; or an extraVolumes entry)" $source.field $volume.name $at) -}}
{{- end -}}
{{- $volumeNames = append $volumeNames $volume.name -}}
{{- $volumes = append $volumes $volume -}}
{{- end -}}
{{- end -}}
{{- range $source := list (dict "field" "extraVolumeMounts" "items" $v.extraVolumeMounts) (dict "field" (printf "%s.extraVolumeMounts" $at) "items" $stage.extraVolumeMounts) -}}
{{- range $mount := $source.items | default list -}}
{{- if not (has $mount.name $volumeNames) -}}
{{- fail (printf "%s: mount of %q names no volume of the %s pods; add it to extraVolumes or %s.extraVolumes" $source.field $mount.name $at $at) -}}
{{- end -}}
{{- if hasKey $paths $mount.mountPath -}}
{{- fail (printf "%s: mountPath %q is already mounted in the %s pods (volume %s)" $source.field $mount.mountPath $at (get $paths $mount.mountPath)) -}}
{{- end -}}
{{- $_ := set $paths $mount.mountPath $mount.name -}}
{{- $mounts = append $mounts $mount -}}
{{- end -}}
{{- end -}}
{{- $hostNetwork := $v.hostNetwork | default false -}}
{{- if not (kindIs "invalid" $stage.hostNetwork) -}}
{{- $hostNetwork = $stage.hostNetwork -}}
{{- end -}}
{{- $dnsPolicy := $stage.dnsPolicy | default $v.dnsPolicy | default (ternary "ClusterFirstWithHostNet" "" $hostNetwork) -}}
{{- toJson (dict "labels" $labels "annotations" $annotations "volumes" $volumes "volumeMounts" $mounts "hostNetwork" $hostNetwork "dnsPolicy" $dnsPolicy) -}}
{{- end -}}
