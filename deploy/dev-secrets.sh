#!/bin/sh
# Make development TLS material and an API token for deploy/docker-compose.yml, in deploy/secrets/ (git-ignored):
#   ca.crt, server.crt, server.key  a CA and a server certificate for localhost, 127.0.0.1 and the compose service
#   client.crt, client.key          a client certificate from the same CA (for mutual TLS)
#   api-token                       a random token (give it to clients: LINLENS_API_KEY=$(cat deploy/secrets/api-token))
#   api-tokens                      what the server reads: the token's SHA-256 digest and a label
# Production certificates come from your PKI (or cert-manager on Kubernetes), never from this script.
# Usage: sh deploy/dev-secrets.sh [FOLDER]   (needs openssl; refuses to overwrite existing files)
set -eu
out=${1:-$(dirname "$0")/secrets}
mkdir -p "$out"
if [ -e "$out/server.key" ]; then
    echo "dev-secrets: $out already holds secrets; remove them first to make new ones" >&2
    exit 1
fi
umask 077
cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=linlens development CA" -keyout ca.key -out ca.crt 2>/dev/null
for name in server client; do
    if [ "$name" = server ]; then
        ext="subjectAltName=DNS:localhost,DNS:linlens,IP:127.0.0.1
extendedKeyUsage=serverAuth"
    else
        ext="extendedKeyUsage=clientAuth"
    fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=linlens-$name" \
        -keyout "$name.key" -out "$name.csr" 2>/dev/null
    printf '%s\n' "$ext" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
done
rm -f ca.key ca.srl
openssl rand -base64 32 | tr -d '\n=' | tr '+/' '-_' > api-token
printf '%s compose-dev\n' "$(tr -d '\n' < api-token | openssl dgst -sha256 -r | cut -d' ' -f1)" > api-tokens
# Compose bind-mounts secret files as they are and the server runs as UID 10001 inside the container, so it must
# be able to read them: development material only (the folder stays out of git and out of the image).
chmod 0644 ca.crt server.crt server.key client.crt api-tokens
chmod 0600 client.key api-token
echo "dev-secrets: wrote $(pwd): ca.crt server.crt server.key client.crt client.key api-token api-tokens"
