{{/*
Checks that values.schema.json cannot express. Each message names the key, the
problem and the --set that fixes it. Included once, from deployments.yaml, so
that `helm template` and `helm install` stop before rendering anything.

Some of these keys are also constrained by the schema (activeSlot is an enum):
the schema then reports first; the checks here still hold when schema
validation is skipped (--skip-schema-validation) or when the values reach the
templates by another path.
*/}}
{{- define "audit-worker.validate" -}}
{{- $active := toString .Values.activeSlot }}
{{- if not (has $active (list "blue" "green")) }}
{{- fail (printf "\n\nactiveSlot must be \"blue\" or \"green\", got %q.\nFix: --set activeSlot=blue (or --set activeSlot=green)." $active) }}
{{- end }}

{{- range $slot := list "blue" "green" }}
{{- $s := index $.Values.slots $slot | default dict }}
{{- if eq (toString ($s.tag | default "")) "" }}
{{- fail (printf "\n\nslots.%s.tag is empty: each slot needs an image tag, even when it is scaled to zero.\nFix: --set slots.%s.tag=<image tag>" $slot $slot) }}
{{- end }}
{{- end }}

{{- $activeReplicas := int ((index .Values.slots $active).replicas | default 0) }}
{{- if lt $activeReplicas 1 }}
{{- fail (printf "\n\nslots.%s.replicas is %d but %s is the active slot: the active Service would select no pods.\nFix: --set slots.%s.replicas=1 (or make the other slot active: --set activeSlot=%s)." $active $activeReplicas $active $active (include "audit-worker.previewSlot" .)) }}
{{- end }}

{{- $_ := required "\n\nsecrets.existingSecret is empty: the chart holds no secret values and reads AUDIT_DATABASE_URL and AUDIT_REDIS_URL from an existing Secret.\nFix: --set secrets.existingSecret=<name of the Secret with keys database-url and redis-url>" (.Values.secrets.existingSecret | default "" | toString | trim) }}

{{- range $key := list "databaseCaFile" "redisCaFile" }}
{{- if hasPrefix "/tmp/" (toString (index $.Values.tls $key)) }}
{{- fail (printf "\n\ntls.%s is under /tmp, which the chart mounts as an empty emptyDir: the CA file would not be there.\nFix: put the CA bundle in the image outside /tmp (e.g. /etc/ssl/certs/<file>.pem) and --set tls.%s=/etc/ssl/certs/<file>.pem" $key $key) }}
{{- end }}
{{- end }}

{{- if eq .Values.keys.backend "kms" }}
{{- if not .Values.keys.kmsDataKeyId }}
{{- fail "\n\nkeys.kmsDataKeyId is empty but keys.backend is kms.\nFix: --set keys.kmsDataKeyId=<KMS key id, ARN or alias>" }}
{{- end }}
{{- if not .Values.keys.kmsSigningKeyId }}
{{- fail "\n\nkeys.kmsSigningKeyId is empty but keys.backend is kms.\nFix: --set keys.kmsSigningKeyId=<KMS asymmetric key id, ARN or alias>" }}
{{- end }}
{{- if not .Values.aws.region }}
{{- fail "\n\naws.region is empty but keys.backend is kms.\nFix: --set aws.region=<region, e.g. eu-west-1>" }}
{{- end }}
{{- else if ne .Values.environment "dev" }}
{{- fail (printf "\n\nkeys.backend is %q but environment is %q: local keys are for dev only.\nFix: --set keys.backend=kms (with keys.kmsDataKeyId and keys.kmsSigningKeyId)." (toString .Values.keys.backend) (toString .Values.environment)) }}
{{- end }}

{{- if .Values.autoscaling.enabled }}
{{- $min := int .Values.autoscaling.minReplicas }}
{{- $max := int .Values.autoscaling.maxReplicas }}
{{- if gt $min $max }}
{{- fail (printf "\n\nautoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d).\nFix: --set autoscaling.maxReplicas=%d" $min $max $min) }}
{{- end }}
{{- if or (lt $activeReplicas $min) (gt $activeReplicas $max) }}
{{- fail (printf "\n\nslots.%s.replicas (%d) is outside the HPA range autoscaling.minReplicas..maxReplicas (%d..%d); each deploy would fight the autoscaler.\nFix: --set slots.%s.replicas=%d" $active $activeReplicas $min $max $active $min) }}
{{- end }}
{{- end }}

{{- $reserved := include "audit-worker.reservedEnv" . | fromYaml }}
{{- range $name, $value := (.Values.extraEnv | default dict) }}
{{- if not (regexMatch "^AUDIT_[A-Z_]+$" $name) }}
{{- fail (printf "\n\nextraEnv.%s: extraEnv only takes worker settings named AUDIT_[A-Z_]+.\nFix: remove extraEnv.%s from the values." $name $name) }}
{{- end }}
{{- if hasKey $reserved $name }}
{{- fail (printf "\n\nextraEnv.%s is not allowed: %s.\nFix: remove extraEnv.%s from the values." $name (get $reserved $name) $name) }}
{{- end }}
{{- if or (kindIs "map" $value) (kindIs "slice" $value) (kindIs "invalid" $value) }}
{{- fail (printf "\n\nextraEnv.%s must be a string, number or boolean, got %s.\nFix: --set-string extraEnv.%s=<value>" $name (kindOf $value) $name) }}
{{- end }}
{{- end }}

{{- $migrationSlot := toString (.Values.migration.slot | default "") }}
{{- if not (has $migrationSlot (list "" "blue" "green")) }}
{{- fail (printf "\n\nmigration.slot must be \"\", \"blue\" or \"green\", got %q.\nFix: --set migration.slot=%s" $migrationSlot $active) }}
{{- end }}
{{- if and .Values.migration.enabled (eq (toString .Values.databaseAuth) "iam") }}
{{- if not .Values.migration.databaseUrl }}
{{- fail "\n\ndatabaseAuth is iam, so the migration Job signs in with an RDS IAM token and needs migration.databaseUrl (postgresql://auditlog_migrator@<dbAddress>:5432/audit?sslmode=verify-full, no password).\nFix: --set migration.databaseUrl=..." }}
{{- end }}
{{- if and .Values.migration.bootstrap.enabled (not (and .Values.migration.bootstrap.databaseUrl .Values.migration.bootstrap.masterSecretArn)) }}
{{- fail "\n\nmigration.bootstrap.enabled needs migration.bootstrap.databaseUrl (postgresql://<dbAddress>:5432/audit?sslmode=verify-full) and migration.bootstrap.masterSecretArn (stack output dbMasterSecretArn).\nFix: set both, or migration.bootstrap.enabled=false once the logins exist" }}
{{- end }}
{{- end }}
{{- end }}
