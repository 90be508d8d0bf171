#!/bin/sh
# Bucket and least-privilege user for qsens on MinIO; run by the qsens-minio-setup Job.
# Idempotent: every step may run again after a partial failure or on the next apply.
#
# Environment: MINIO_ROOT_USER/MINIO_ROOT_PASSWORD (qsens-minio-root), QSENS_S3_ACCESS_KEY/
# QSENS_S3_SECRET_KEY (qsens-s3), QSENS_S3_ENDPOINT/QSENS_S3_BUCKET (qsens-common).
set -eu

# mc keeps its aliases under ~/.mc by default, on the read-only root filesystem.
mc() { command mc --config-dir /tmp/mc --quiet "$@"; }

url="http://${QSENS_S3_ENDPOINT}"
bucket="${QSENS_S3_BUCKET}"

attempts=0
until mc alias set root "$url" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1 \
    && mc admin info root >/dev/null 2>&1; do
    attempts=$((attempts + 1))
    if [ "$attempts" -ge 100 ]; then
        echo "MinIO at $url did not answer with the root credentials" >&2
        exit 1
    fi
    echo "waiting for MinIO at $url"
    sleep 3
done

mc mb --ignore-existing "root/${bucket}"
mc anonymous set none "root/${bucket}"

# qsens writes every object once (If-None-Match: *) and never deletes artefacts. It deletes
# only the store's own write-once probe under _qsens/ and, under quantized/<checkpoint>/, the
# parts-<attempt>/ objects of quantize attempts that no manifest names (the quantizer checks
# that before deleting; manifests and everything under runs/ stay undeletable).
cat > /tmp/qsens-policy.json <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
     "Resource": ["arn:aws:s3:::${bucket}"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
     "Resource": ["arn:aws:s3:::${bucket}/*"]},
    {"Effect": "Allow", "Action": ["s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::${bucket}/_qsens/*",
                  "arn:aws:s3:::${bucket}/quantized/*/parts-*"]}
  ]
}
POLICY

mc admin user add root "$QSENS_S3_ACCESS_KEY" "$QSENS_S3_SECRET_KEY"
mc admin policy create root qsens-artefacts /tmp/qsens-policy.json
if ! attached=$(mc admin policy attach root qsens-artefacts --user "$QSENS_S3_ACCESS_KEY" 2>&1); then
    # A second run finds the policy attached already; anything else is a real failure.
    # (Shell matching, not grep: the mc image is minimal.)
    case "$attached" in
        *lready*) ;;
        *) printf '%s\n' "$attached" >&2; exit 1 ;;
    esac
fi

# The qsens user can see the bucket: what every qsens process does first.
mc alias set qsens "$url" "$QSENS_S3_ACCESS_KEY" "$QSENS_S3_SECRET_KEY" >/dev/null
mc ls "qsens/${bucket}" >/dev/null
echo "bucket ${bucket} ready for user ${QSENS_S3_ACCESS_KEY}"
