#!/bin/sh
# make-secrets.sh DIR: the Secrets' contents a Sluice deployment needs and no manifest holds,
# written as files into DIR (mode 0600), to load with kubectl (docs/deploy.md, "Secrets"):
#   DIR/tenants.yaml          -> Secret sluice-tenants, key tenants.yaml: one admin tenant
#                                "admin" whose API key is stored only as its SHA-256 hash
#                                (sluice/runtime/auth.py)
#   DIR/admin-api-key         -> for you: that tenant's key (shown nowhere else)
#   DIR/users.acl,            -> Secret sluice-redis-acl, keys users.acl (the jobs and quotas
#   DIR/users-cache.acl          Redis: user scheduler) and users-cache.acl (the cache's Redis:
#                                user cache); each line as sluice/local/lockdown.py writes it
#                                for `sluice up` (no default user; each user limited to its key
#                                prefixes), each Redis knowing only the user that calls it
#   DIR/redis-url-scheduler,  -> Secret sluice-redis-urls, keys scheduler and cache: rediss://
#   DIR/redis-url-cache          URLs with each user's password and the pod's TLS files
# Needs only sh, openssl and sha256sum. Run it again for new passwords (then restart both
# Redis, the schedulers and the cache). SLUICE_REDIS_HOST and SLUICE_REDIS_CACHE_HOST
# (host:port) point the URLs elsewhere, for a managed Redis.
set -eu
dir=${1:?usage: make-secrets.sh DIR}
redis_host=${SLUICE_REDIS_HOST:-sluice-redis:6379}
cache_redis_host=${SLUICE_REDIS_CACHE_HOST:-sluice-redis-cache:6379}
umask 077
mkdir -p "$dir"

sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
token() { openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n'; }

key="sk-sluice-$(token)"
printf '%s\n' "$key" > "$dir/admin-api-key"
cat > "$dir/tenants.yaml" <<TENANTS
tenants:
- name: admin
  api_key_hashes:
  - sha256:$(sha256 "$key")
  admin: true
TENANTS

commands='+@all -@admin -@dangerous +ping +info'
tls='ssl_ca_certs=/etc/sluice/tls/ca.crt&ssl_certfile=/etc/sluice/tls/tls.crt&ssl_keyfile=/etc/sluice/tls/tls.key'
cache_pw=$(openssl rand -hex 24)
scheduler_pw=$(openssl rand -hex 24)
no_default='user default off resetkeys resetchannels -@all'
{
  echo "$no_default"
  echo "user scheduler on #$(sha256 "$scheduler_pw") resetkeys ~sluice:quota:* ~sluice:jobs:* resetchannels $commands"
} > "$dir/users.acl"
{
  echo "$no_default"
  echo "user cache on #$(sha256 "$cache_pw") resetkeys ~sluice:cache:* resetchannels $commands"
} > "$dir/users-cache.acl"
printf 'rediss://cache:%s@%s/0?%s' "$cache_pw" "$cache_redis_host" "$tls" > "$dir/redis-url-cache"
printf 'rediss://scheduler:%s@%s/0?%s' "$scheduler_pw" "$redis_host" "$tls" > "$dir/redis-url-scheduler"
echo "written to $dir: tenants.yaml, admin-api-key, users.acl, users-cache.acl, redis-url-cache, redis-url-scheduler"
