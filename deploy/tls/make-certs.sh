#!/usr/bin/env bash
# Makes a private CA and the certificates a secured teaserve deployment uses, with openssl:
#   ca.pem / ca.key                      the deployment's CA (keep ca.key offline)
#   controller.pem / controller.key      the controller's server certificate (clients verify it)
#                                        and its client certificate towards the denoisers
#   denoiser.pem / denoiser.key          the denoisers' server certificate
#   tokens.txt                           a bearer token for the controller's public API
# Usage: deploy/tls/make-certs.sh OUT_DIR [CONTROLLER_HOST] [DENOISER_HOST]
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [CONTROLLER_HOST] [DENOISER_HOST]}
controller_host=${2:-localhost}
denoiser_host=${3:-localhost}
mkdir -p "$out"
cd "$out"
days=825

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -keyout ca.key -out ca.pem -subj "/CN=teaserve deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() { # name host extendedKeyUsage
  local name=$1 host=$2 usage=$3
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$name.key" -out "$name.csr" -subj "/CN=$host" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' \
    "$host" "$usage" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -out "$name.pem" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
leaf controller "$controller_host" serverAuth,clientAuth
leaf denoiser "$denoiser_host" serverAuth
# rustls reads PKCS#8 keys; openssl 3 writes them by default.
printf '%s\n' "$(openssl rand -hex 32)" > tokens.txt
chmod 600 ./*.key tokens.txt
echo "wrote $(pwd): ca.pem, controller.pem/.key, denoiser.pem/.key, tokens.txt"
