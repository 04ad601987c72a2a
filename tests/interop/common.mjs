// Shared plumbing of the npm-client scenarios (tests/interop/test_npm_clients.py runs them).
//
// A scenario reads one JSON object on stdin (issuer, URLs, tokens, PEM paths, the feature to run),
// runs named steps with an unmodified client library and prints one JSON object on stdout:
//   {"feature": ..., "steps": {"<name>": {"ok": true, "value": ...} | {"ok": false, "error": {...}}}}
// "ok" only says whether the library call returned or threw; the Python test decides what is right.
// Nothing else is written to stdout.

import { readFileSync } from 'node:fs'
import * as undici from 'undici'

export const GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange'
export const JWT_TYPE = 'urn:ietf:params:oauth:token-type:jwt'
export const JWT_SPIFFE = 'urn:ietf:params:oauth:client-assertion-type:jwt-spiffe'

async function readStdin() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

// The JSON-safe facts of a thrown error, whatever library threw it.
export function describeError(err) {
  if (!(err instanceof Error)) return { name: typeof err, message: String(err) }
  const out = { name: err.name, message: err.message }
  for (const field of ['code', 'error', 'error_description', 'status', 'claim', 'reason']) {
    if (err[field] !== undefined) out[field] = err[field]
  }
  if (err.cause !== undefined) out.cause = jsonSafe(err.cause)
  return out
}

function jsonSafe(value) {
  try {
    if (value instanceof Error) return describeError(value)
    if (typeof Response !== 'undefined' && value instanceof Response) return { status: value.status }
    if (value instanceof URL) return value.href
    return JSON.parse(JSON.stringify(value, (_k, v) => (v instanceof URL ? v.href : v)))
  } catch {
    return String(value)
  }
}

// The claims of a compact JWS, unverified (what a client sees without keys).
export function claimsOf(jwt) {
  return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString('utf8'))
}

export function headerOf(jwt) {
  return JSON.parse(Buffer.from(jwt.split('.')[0], 'base64url').toString('utf8'))
}

// RFC 8705 §3.1 x5t#S256 of a PEM certificate, computed here (not by the server).
export function certificateThumbprint(pemPath) {
  const der = Buffer.from(
    readFileSync(pemPath, 'utf8')
      .replace(/-----(BEGIN|END) CERTIFICATE-----/g, '')
      .replace(/\s+/g, ''),
    'base64',
  )
  return globalThis.crypto.subtle.digest('SHA-256', der).then((d) => Buffer.from(d).toString('base64url'))
}

// A fetch for the libraries' customFetch option: undici with a dispatcher that trusts the test CA and,
// when given, presents a client certificate (oauth4webapi's documented mTLS recipe). Every request's
// method and URL is appended to `log`, so a test can tell which listener a library talked to.
export function recordingFetch(log, { ca, cert, key } = {}) {
  const connect = {}
  if (ca) connect.ca = readFileSync(ca, 'utf8')
  if (cert) connect.cert = readFileSync(cert, 'utf8')
  if (key) connect.key = readFileSync(key, 'utf8')
  const dispatcher = new undici.Agent({ connect })
  return (url, options = {}) => {
    log.push(`${options.method ?? 'GET'} ${url}`)
    return undici.fetch(url, { ...options, dispatcher })
  }
}

// Runs `main(input, step)`; `step(name, fn)` records what `fn` returned or threw under `name`.
export async function run(main) {
  const input = await readStdin()
  const out = { feature: input.feature, steps: {} }
  const step = async (name, fn) => {
    try {
      const value = await fn()
      out.steps[name] = { ok: true, value: value === undefined ? null : jsonSafe(value) }
      return value
    } catch (err) {
      out.steps[name] = { ok: false, error: describeError(err) }
      return undefined
    }
  }
  try {
    await main(input, step)
  } catch (err) {
    out.fatal = describeError(err)
  }
  process.stdout.write(`${JSON.stringify(out)}\n`)
}
