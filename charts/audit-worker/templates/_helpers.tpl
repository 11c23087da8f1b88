{{/*
Chart name, overridable with nameOverride. Truncated to 63 characters, the
limit of a DNS label and of a label value.
*/}}
{{- define "audit-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart>", or the release name alone when
it already contains the chart name, or fullnameOverride.
*/}}
{{- define "audit-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<fullname>-<suffix>" kept within 63 characters by shortening the fullname,
never the suffix. Call with (dict "root" $ "suffix" "blue").
*/}}
{{- define "audit-worker.componentName" -}}
{{- $max := sub 62 (len .suffix) | int }}
{{- printf "%s-%s" (include "audit-worker.fullname" .root | trunc $max | trimSuffix "-") .suffix }}
{{- end }}

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "audit-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A string made safe as a label value: invalid characters replaced, at most 63
characters, starting and ending with an alphanumeric character.
*/}}
{{- define "audit-worker.labelValue" -}}
{{- $v := regexReplaceAll "[^A-Za-z0-9._-]" (toString .) "-" | trunc 63 }}
{{- $v = regexReplaceAll "^[^A-Za-z0-9]+" $v "" }}
{{- regexReplaceAll "[^A-Za-z0-9]+$" $v "" }}
{{- end }}

{{/*
The label key that carries the blue-green slot.
*/}}
{{- define "audit-worker.slotLabelKey" -}}
audit-worker/slot
{{- end }}

{{/*
Common labels of every object.
*/}}
{{- define "audit-worker.labels" -}}
helm.sh/chart: {{ include "audit-worker.chart" . }}
{{ include "audit-worker.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ include "audit-worker.labelValue" .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audit-log
{{- end }}

{{/*
Labels of a slot's objects: the common labels, with app.kubernetes.io/version
set to the slot's image tag, plus component and slot.
Call with (dict "root" $ "slot" "blue").
*/}}
{{- define "audit-worker.slotLabels" -}}
{{- $root := .root }}
{{- $tag := (index $root.Values.slots .slot).tag -}}
helm.sh/chart: {{ include "audit-worker.chart" $root }}
{{ include "audit-worker.slotSelectorLabels" . }}
app.kubernetes.io/version: {{ include "audit-worker.labelValue" $tag | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: audit-log
app.kubernetes.io/component: worker
{{- end }}

{{/*
Selector labels: name and instance. Shared by every pod of the release (both
slots and the migration Job); used by the NetworkPolicy.
*/}}
{{- define "audit-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audit-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of one slot: name, instance and slot. Used by the slot's
Deployment, PodDisruptionBudget and topology spread, and by the Services.
Call with (dict "root" $ "slot" "blue").
*/}}
{{- define "audit-worker.slotSelectorLabels" -}}
{{ include "audit-worker.selectorLabels" .root }}
{{ include "audit-worker.slotLabelKey" .root }}: {{ .slot }}
{{- end }}

{{/*
The slot that is not active: the preview slot.
*/}}
{{- define "audit-worker.previewSlot" -}}
{{- if eq .Values.activeSlot "blue" }}green{{ else }}blue{{ end }}
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "audit-worker.migrationServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-migrate" (include "audit-worker.fullname" . | trunc 55 | trimSuffix "-")) .Values.migration.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.migration.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "audit-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "audit-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Full image reference of a slot: repository:tag, or repository:tag@sha256:... when the
slot has a digest (slots.<slot>.digest), which pins the tag to one image for good.
Call with (dict "root" $ "slot" "blue").
*/}}
{{- define "audit-worker.image" -}}
{{- $s := index .root.Values.slots .slot }}
{{- printf "%s:%s" .root.Values.image.repository $s.tag }}
{{- with $s.digest }}@{{ . }}{{ end }}
{{- end }}

{{/*
Pod-level security context shared by the worker and the migration Job: uid and
gid 10001, never root, the runtime's default seccomp profile.
*/}}
{{- define "audit-worker.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level security context shared by the worker and the migration Job.
*/}}
{{- define "audit-worker.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Environment of the migration Job: plainEnv, AUDIT_REDIS_URL from the Secret, extraEnv.
The slot is passed separately (AUDIT_SLOT), and so is AUDIT_DATABASE_URL (the schema
owner's secrets.migrationDatabaseUrlKey). The worker Deployments take plainEnv and
extraEnv only: they read AUDIT_DATABASE_URL (secrets.databaseUrlKey, an audit_writer
login), AUDIT_REDIS_URL and AUDIT_INTAKE_TOKENS from files (secretsVolume). Secret values
are only referenced, never rendered. _validate.tpl refuses any name set here in extraEnv.
*/}}
{{- define "audit-worker.env" -}}
{{ include "audit-worker.plainEnv" . }}
- name: AUDIT_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret | quote }}
      key: {{ .Values.secrets.redisUrlKey | quote }}
{{- include "audit-worker.extraEnv" . }}
{{- end }}

{{/*
The shared variables that are not secret (no extraEnv): the worker Deployments take these
and read their secrets from files (audit-worker.secretsVolume).
*/}}
{{- define "audit-worker.plainEnv" -}}
- name: AUDIT_DATABASE_AUTH
  value: {{ .Values.databaseAuth | quote }}
- name: AUDIT_ENVIRONMENT
  value: {{ .Values.environment | quote }}
- name: AUDIT_LOG_ID
  value: {{ .Values.logId | quote }}
- name: AUDIT_HTTP_PORT
  value: "8080"
- name: AUDIT_INTAKE_PORT
  value: "8081"
- name: AUDIT_BATCH_SIZE
  value: {{ .Values.worker.batchSize | toString | quote }}
- name: AUDIT_SIGN_INTERVAL_SECONDS
  value: {{ .Values.worker.signIntervalSeconds | toString | quote }}
- name: AUDIT_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.worker.shutdownGraceSeconds | toString | quote }}
- name: AUDIT_KEY_BACKEND
  value: {{ .Values.keys.backend | quote }}
- name: AUDIT_KMS_DATA_KEY_ID
  value: {{ .Values.keys.kmsDataKeyId | quote }}
- name: AUDIT_KMS_SIGNING_KEY_ID
  value: {{ .Values.keys.kmsSigningKeyId | quote }}
- name: AUDIT_AWS_REGION
  value: {{ .Values.aws.region | quote }}
- name: AUDIT_ARCHIVE_BUCKET
  value: {{ .Values.aws.archiveBucket | quote }}
- name: AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS
  value: {{ .Values.aws.archiveDetachVerifiedMonths | toString | quote }}
- name: AUDIT_LOG_FORMAT
  value: "json"
- name: AUDIT_DATABASE_CA_FILE
  value: {{ .Values.tls.databaseCaFile | quote }}
- name: AUDIT_REDIS_CA_FILE
  value: {{ .Values.tls.redisCaFile | quote }}
{{- end }}

{{/*
extraEnv, each entry on its own line after a newline; _validate.tpl refuses reserved names.
*/}}
{{- define "audit-worker.extraEnv" -}}
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ include "audit-worker.envValue" $value }}
{{- end }}
{{- end }}

{{/*
Where the worker Deployments mount their secrets: one file per setting, named as the
variable (AUDIT_DATABASE_URL, AUDIT_REDIS_URL, AUDIT_INTAKE_TOKENS), read by the worker
through AUDIT_SECRETS_DIR (audit_worker.config). Files, not variables: a variable is
inherited by every child process and shown by `kubectl describe`-style tooling and crash
dumps of the environment; a file is read once by the worker alone.
*/}}
{{- define "audit-worker.secretsDir" -}}
/var/run/secrets/audit-worker
{{- end }}

{{/*
The projected volume of the worker's secret files. The intake tokens are a source of
their own with optional: true, so a Secret without the key leaves the intake off while
a missing database or Redis key still stops the pod from starting.
*/}}
{{- define "audit-worker.secretsVolume" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ .Values.secrets.existingSecret | quote }}
          items:
            - key: {{ .Values.secrets.databaseUrlKey | quote }}
              path: AUDIT_DATABASE_URL
            - key: {{ .Values.secrets.redisUrlKey | quote }}
              path: AUDIT_REDIS_URL
      {{- with .Values.secrets.intakeTokensKey }}
      - secret:
          name: {{ $.Values.secrets.existingSecret | quote }}
          optional: true
          items:
            - key: {{ . | quote }}
              path: AUDIT_INTAKE_TOKENS
      {{- end }}
{{- end }}

{{/*
The Secret that holds the migration Job's database URL.
*/}}
{{- define "audit-worker.migrationSecret" -}}
{{- .Values.secrets.migrationSecret | default .Values.secrets.existingSecret }}
{{- end }}

{{/*
An extraEnv value as a quoted string: whole numbers without an exponent
(YAML numbers reach the templates as float64), booleans as true/false.
*/}}
{{- define "audit-worker.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}

{{/*
Variables extraEnv may not set, as a dict: name -> what to do instead.
*/}}
{{- define "audit-worker.reservedEnv" -}}
AUDIT_SLOT: "it is the slot of each Deployment (blue or green) and is set by the chart"
AUDIT_ENVIRONMENT: "set environment instead"
AUDIT_LOG_ID: "set logId instead"
AUDIT_HTTP_PORT: "the ports, probes and Services are on 8080"
AUDIT_INTAKE_PORT: "the intake's container port, Service port (service.intakePort) and NetworkPolicy are on 8081"
AUDIT_HTTP_HOST: "the probes and Services need the worker to listen on 0.0.0.0"
AUDIT_BATCH_SIZE: "set worker.batchSize instead"
AUDIT_SIGN_INTERVAL_SECONDS: "set worker.signIntervalSeconds instead"
AUDIT_SHUTDOWN_GRACE_SECONDS: "set worker.shutdownGraceSeconds instead (it also sets terminationGracePeriodSeconds)"
AUDIT_KEY_BACKEND: "set keys.backend instead"
AUDIT_KMS_DATA_KEY_ID: "set keys.kmsDataKeyId instead"
AUDIT_KMS_SIGNING_KEY_ID: "set keys.kmsSigningKeyId instead"
AUDIT_AWS_REGION: "set aws.region instead"
AUDIT_DATABASE_AUTH: "set databaseAuth instead"
AUDIT_ARCHIVE_BUCKET: "set aws.archiveBucket instead"
AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS: "set aws.archiveDetachVerifiedMonths instead"
AUDIT_LOG_FORMAT: "the chart always logs json"
AUDIT_DATABASE_CA_FILE: "set tls.databaseCaFile instead"
AUDIT_REDIS_CA_FILE: "set tls.redisCaFile instead"
AUDIT_CONSUMER_NAME: "each pod must be its own Redis consumer; the worker uses the pod's host name"
AUDIT_DATABASE_URL: "it is secret: put it in the Secret (secrets.databaseUrlKey, secrets.migrationDatabaseUrlKey)"
AUDIT_REDIS_URL: "it is secret: put it in the Secret (secrets.redisUrlKey)"
AUDIT_INTAKE_TOKENS: "it is secret: put it in the Secret (secrets.intakeTokensKey)"
AUDIT_SECRETS_DIR: "the chart mounts the worker's secret files there, from secrets.existingSecret"
{{- end }}

{{/*
terminationGracePeriodSeconds: the worker's shutdown grace plus 10 s for the
process to exit after it has finished the batch in hand.
*/}}
{{- define "audit-worker.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSeconds) 10 }}
{{- end }}

{{/*
An IntOrString value: "50%" stays a quoted string, 2 (or 2.0) becomes 2.
*/}}
{{- define "audit-worker.intOrString" -}}
{{- if kindIs "string" . }}{{ quote . }}{{ else }}{{ int . }}{{ end }}
{{- end }}
