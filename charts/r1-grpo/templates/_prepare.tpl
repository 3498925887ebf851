{{/*
The prepare stage's hand-off, copied from trainer/contract/prepared.py (Helm cannot call Python; held equal
by tests/test_chart.py): which --dataset_name entries are hub datasets, where prepare puts them, and the later
stages' rewritten --dataset_name.
*/}}

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
