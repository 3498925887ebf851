"""Creating a stage's job: every stage's attempt-1 job as a server-side dry run with strict field validation
before anything runs, and each attempt create-if-absent, adopting a 409 only when the existing job is this
install's. A mixin of the Controller (it also calls the Controller's `_write` and `_claim_folder` and reads
`_pipeline`); the job API is the stages' (jobkinds.py)."""

from __future__ import annotations

from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.cluster import (
    DENIED_ADMISSION,
    DENIED_QUOTA,
    Cluster,
    api_error_summary,
    classify_api_error,
)
from trainer.executors.kubernetes.decide import CreateBlocked, CreateJob
from trainer.executors.kubernetes.jsonlog import log
from trainer.executors.kubernetes.spec import (
    ATTEMPT_LABEL,
    INSTANCE_LABEL,
    STAGE_LABEL,
    ConfigError,
    ControllerConfig,
    Pipeline,
    StageRejected,
    check_stage_flags,
    job_manifest,
    job_name,
)
from trainer.executors.kubernetes.world import World, owner_uids


class JobCreation:
    cluster: Cluster
    config: ControllerConfig
    _pipeline: tuple[tuple, Pipeline] | None
    _validated: tuple | None

    def validate_jobs(self, pipeline: Pipeline) -> None:
        """Create every stage's attempt-1 job as a server-side dry run (strict field validation), once per
        version of the stages ConfigMap: what the API server or an admission webhook would reject fails the
        run now, not when that stage's turn comes."""
        key = self._pipeline[0] if self._pipeline else None
        if key is not None and all(key) and self._validated == key:
            return
        cfg = self.config
        for spec in pipeline.stages:  # the flags first: no API call needed
            check_stage_flags(
                spec,
                f"{spec.kind.kind} {job_name(cfg.release, spec.name, 1)} in ConfigMap "
                f"{cfg.stages_configmap} key {spec.job_key},",
            )
        for spec in pipeline.stages:
            body = job_manifest(pipeline, spec, 1, cfg.namespace, cfg.stages_configmap)
            name = body["metadata"]["name"]
            try:
                self.cluster.create_job(body, dry_run=True)  # 409: the name exists, so it once passed
            except ApiException as e:
                denied = classify_api_error(e)
                where = (
                    f"stage {spec.name}: {spec.kind.kind} {name} (ConfigMap {cfg.stages_configmap} key "
                    f"{spec.job_key}) is rejected by"
                )
                if e.status in (400, 422):
                    raise StageRejected(f"{where} the API server: {api_error_summary(e)}", spec.name) from e
                if denied == DENIED_ADMISSION:
                    raise StageRejected(
                        f"{where} an admission webhook: {api_error_summary(e)}", spec.name
                    ) from e
                if e.status == 404:
                    raise ConfigError(
                        f"{where} the API server: {api_error_summary(e)} - is {spec.kind.installed} installed?"
                    ) from e
                if denied == DENIED_QUOTA:  # quota is checked after the schema and the webhooks
                    log("info", "dry run stopped at a ResourceQuota; the job itself is valid", job=name)
                    continue
                raise
        self._validated = key
        log("info", "stage jobs pass a server-side dry run", stages=[s.name for s in pipeline.stages])

    def create_job(self, action: CreateJob, world: World) -> CreateBlocked | None:
        """Create the action's attempt; a CreateBlocked when the create is refused for now (quota, a job of
        an earlier install still being collected), else None."""
        cfg = self.config
        kind = world.pipeline.kind
        spec = world.pipeline.stage(action.stage)
        body = job_manifest(world.pipeline, spec, action.attempt, cfg.namespace, cfg.stages_configmap)
        name = body["metadata"]["name"]
        self._claim_folder(world.pipeline, spec)
        self._write(f"create job {name}")
        try:
            created, existing = self.cluster.create_job(body)
        except ApiException as e:
            denied = classify_api_error(e)
            if e.status in (400, 404, 422) or denied == DENIED_ADMISSION:
                # retrying cannot help: the job or the CRD is wrong, or a webhook refuses it
                raise ConfigError(
                    f"stage {action.stage}: the API server rejected {kind.kind} {name} (from ConfigMap key "
                    f"{spec.job_key}): {api_error_summary(e)}"
                    + (f" - is {kind.operator} installed?" if e.status == 404 else "")
                ) from e
            if denied == DENIED_QUOTA:
                return CreateBlocked(action.stage, action.attempt, action.reason, api_error_summary(e))
            raise
        if created:
            log(
                "info",
                "created job",
                job=name,
                stage=action.stage,
                attempt=action.attempt,
                reason=action.reason,
            )
        elif existing is None:
            raise ApiException(status=409, reason=f"job {name} exists but could not be read back")
        else:
            labels = (existing.get("metadata") or {}).get("labels") or {}
            want = {
                INSTANCE_LABEL: cfg.release,
                STAGE_LABEL: action.stage,
                ATTEMPT_LABEL: str(action.attempt),
            }
            if any(labels.get(k) != v for k, v in want.items()):
                raise ConfigError(
                    f"{kind.kind} {cfg.namespace}/{name} already exists but is not this "
                    f"release's job (labels {labels}); delete or rename it"
                )
            uid = world.pipeline.configmap_uid
            if uid and uid not in owner_uids(existing):
                refs = (existing.get("metadata") or {}).get("ownerReferences") or []
                earlier = [
                    r for r in refs if r.get("kind") == "ConfigMap" and r.get("name") == cfg.stages_configmap
                ]
                if earlier:  # its owner is gone, so the garbage collector will delete it
                    return CreateBlocked(
                        action.stage,
                        action.attempt,
                        action.reason,
                        f"{kind.kind} {name} of an earlier install of this release (owner ConfigMap "
                        f"{cfg.stages_configmap} uid {earlier[0].get('uid')}, this install's is {uid}) "
                        f"still exists; waiting for the garbage collector to delete it",
                    )
                raise ConfigError(
                    f"{kind.kind} {cfg.namespace}/{name} already exists but is not owned by this "
                    f"install's ConfigMap {cfg.stages_configmap} (uid {uid}; its owners: "
                    f"{[(r.get('kind'), r.get('name'), r.get('uid')) for r in refs]}); delete or rename it"
                )
            log(
                "info",
                "job already exists (409); adopting it",
                job=name,
                stage=action.stage,
                attempt=action.attempt,
            )
        return None
