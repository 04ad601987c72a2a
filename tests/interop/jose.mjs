// panva/jose v6 as a resource server verifies our tokens (RFC 9068); see test_npm_clients.py.
// Features (input.feature): tool_jwks, data_jwks, claims.

import * as jose from 'jose'
import { run } from './common.mjs'

async function metadata(issuer) {
  const response = await fetch(`${issuer}/.well-known/oauth-authorization-server`)
  return response.json()
}

const features = {
  // The tool class key set verifies a tool token, as an RFC 9068 access token of our issuer.
  async tool_jwks(input, step) {
    const as = await metadata(input.issuer)
    const tool = jose.createRemoteJWKSet(new URL(as.tool_jwks_uri))
    const options = { issuer: input.issuer, audience: 'tool:calc', typ: 'at+jwt', algorithms: ['ES256'] }
    await step('verify_tool_token', () => jose.jwtVerify(input.tool_token, tool, options))
    await step('verify_with_all_keys', () =>
      jose.jwtVerify(input.tool_token, jose.createRemoteJWKSet(new URL(as.jwks_uri)), options),
    )
    await step('verify_data_token', () =>
      jose.jwtVerify(input.data_token, tool, { ...options, audience: 'data:crm' }),
    )
  },

  // A verifier that loaded only the data class keys cannot be unlocked by a tool token.
  async data_jwks(input, step) {
    const as = await metadata(input.issuer)
    const data = jose.createRemoteJWKSet(new URL(as.data_jwks_uri))
    const options = { issuer: input.issuer, typ: 'at+jwt', algorithms: ['ES256'] }
    await step('verify_data_token', () =>
      jose.jwtVerify(input.data_token, data, { ...options, audience: 'data:crm' }),
    )
    await step('verify_tool_token', () =>
      jose.jwtVerify(input.tool_token, data, { ...options, audience: 'tool:calc' }),
    )
    // Even ignoring kid: no data key's signature check passes for the tool token.
    const keys = (await (await fetch(as.data_jwks_uri)).json()).keys
    await step('data_key_count', () => keys.length)
    for (const [index, jwk] of keys.entries()) {
      await step(`verify_tool_token_with_data_key_${index}`, async () =>
        jose.jwtVerify(input.tool_token, await jose.importJWK(jwk, 'ES256'), {
          ...options,
          audience: 'tool:calc',
        }),
      )
    }
  },

  async claims(input, step) {
    const as = await metadata(input.issuer)
    const tool = jose.createRemoteJWKSet(new URL(as.tool_jwks_uri))
    const options = { issuer: input.issuer, audience: 'tool:calc', typ: 'at+jwt', algorithms: ['ES256'] }
    await step('wrong_audience', () =>
      jose.jwtVerify(input.tool_token, tool, { ...options, audience: 'tool:web-search' }),
    )
    await step('wrong_issuer', () =>
      jose.jwtVerify(input.tool_token, tool, { ...options, issuer: 'https://elsewhere.example' }),
    )
    await step('wrong_typ', () => jose.jwtVerify(input.tool_token, tool, { ...options, typ: 'JWT' }))
    await step(
      'required_claims',
      async () =>
        (
          await jose.jwtVerify(input.tool_token, tool, {
            ...options,
            requiredClaims: ['iss', 'sub', 'aud', 'exp', 'iat', 'jti', 'client_id'],
          })
        ).payload,
    )
  },
}

await run((input, step) => features[input.feature](input, step))
