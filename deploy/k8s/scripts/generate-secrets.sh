#!/bin/sh
# Write the credential files that deploy/k8s/base/kustomization.yaml turns into Secrets:
#   base/secrets/{nats,s3,minio-root}.env   random, generated here
#   base/secrets/loader-token.env           random: the token loaders require of every client
#   base/secrets/judge.env                  OPENAI_API_KEY from the environment (may be empty)
#   base/secrets/hf.env                     HF_TOKEN from the environment (may be empty)
# Existing files are kept (rotating a credential is deleting its file and re-running this,
# then re-applying: pods roll because the Secret's name hash changes). The files are
# git-ignored and readable by their owner only.
#
#   OPENAI_API_KEY=sk-... HF_TOKEN=hf_... deploy/k8s/scripts/generate-secrets.sh
set -eu

dir="$(cd "$(dirname "$0")/../base/secrets" && pwd)"
umask 077

# Letters and digits only, starting with a letter: nats.conf reads the NATS values as config
# tokens, and URLs and shells need no quoting.
random_token() {
    printf 'q%s' "$(LC_ALL=C tr -dc 'a-z0-9' </dev/urandom | head -c "$1")"
}

write() {
    file="$dir/$1"
    shift
    if [ -e "$file" ]; then
        echo "kept      $file"
        return
    fi
    : >"$file"
    for line in "$@"; do
        printf '%s\n' "$line" >>"$file"
    done
    echo "generated $file"
}

write nats.env "QSENS_NATS_USER=$(random_token 11)" "QSENS_NATS_PASSWORD=$(random_token 40)"
write s3.env "QSENS_S3_ACCESS_KEY=$(random_token 19)" "QSENS_S3_SECRET_KEY=$(random_token 40)"
write minio-root.env "MINIO_ROOT_USER=$(random_token 15)" "MINIO_ROOT_PASSWORD=$(random_token 40)"
write loader-token.env "token=$(random_token 48)"
write judge.env "OPENAI_API_KEY=${OPENAI_API_KEY:-}"
write hf.env "HF_TOKEN=${HF_TOKEN:-}"
