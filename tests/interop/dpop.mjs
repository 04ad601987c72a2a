// panva/dpop v2: proofs built by the library, sent by plain fetch; see test_npm_clients.py.
// Feature "exchange" (input.alg): a DPoP-bound token, then a proof for the resource server (ath).

import * as dpop from 'dpop'
import * as jose from 'jose'
import * as oauth from 'oauth4webapi'
import { GRANT, JWT_TYPE, claimsOf, headerOf, run } from './common.mjs'

const RESOURCE = 'https://calc.tools.internal/invoke'

const features = {
  async exchange(input, step) {
    const keyPair = await dpop.generateKeyPair(input.alg)
    const tokenEndpoint = `${input.issuer}/token`
    const proof = await dpop.generateProof(keyPair, tokenEndpoint, 'POST')
    await step('proof_header', () => headerOf(proof))
    const body = await step('exchange', async () => {
      const response = await fetch(tokenEndpoint, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', dpop: proof },
        body: new URLSearchParams({
          grant_type: GRANT,
          subject_token: input.tokens.subject,
          subject_token_type: JWT_TYPE,
          audience: 'tool:calc',
          scope: 'invoke',
        }),
      })
      return { status: response.status, body: await response.json() }
    })
    await step('thumbprint_dpop', () => dpop.calculateThumbprint(keyPair.publicKey))
    await step('thumbprint_jose', async () =>
      jose.calculateJwkThumbprint(await jose.exportJWK(keyPair.publicKey)),
    )
    const token = body?.body?.access_token
    if (!token) return
    // The proof a client sends with the token to the tool (RFC 9449 §7): ath is the token's hash.
    const resourceProof = await dpop.generateProof(keyPair, RESOURCE, 'POST', undefined, token)
    await step('resource_proof', async () => ({
      claims: claimsOf(resourceProof),
      expected_ath: jose.base64url.encode(
        new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(token))),
      ),
      jwk_thumbprint: await jose.calculateJwkThumbprint(headerOf(resourceProof).jwk),
    }))
    // An independent resource-server check of both: oauth4webapi's RFC 9068 + RFC 9449 validation.
    const as = await oauth.processDiscoveryResponse(
      new URL(input.issuer),
      await oauth.discoveryRequest(new URL(input.issuer), {
        algorithm: 'oauth2',
        [oauth.allowInsecureRequests]: true,
      }),
    )
    const request = new Request(RESOURCE, {
      method: 'POST',
      headers: { authorization: `DPoP ${token}`, dpop: resourceProof },
    })
    await step('validate_at_resource_server', () =>
      oauth.validateJwtAccessToken(as, request, 'tool:calc', { [oauth.allowInsecureRequests]: true }),
    )
  },
}

await run((input, step) => features[input.feature](input, step))
