// panva/openid-client v6 against our issuer, used as its documentation shows; see test_npm_clients.py.
// Features (input.feature): discovery, exchange, errors, dpop, mtls, introspection.

import * as client from 'openid-client'
import { calculateJwkThumbprint } from 'jose'
import { GRANT, JWT_SPIFFE, JWT_TYPE, certificateThumbprint, recordingFetch, run } from './common.mjs'

// The issuer is http://127.0.0.1 (loopback tests); RFC 8414 metadata, not OpenID Connect discovery.
function discover(input, clientId, metadata, auth, options = {}) {
  return client.discovery(new URL(input.issuer), clientId, metadata, auth, {
    algorithm: 'oauth2',
    execute: [client.allowInsecureRequests],
    ...options,
  })
}

function exchangeParameters(input, audience = 'tool:calc', scope = 'invoke') {
  return { subject_token: input.tokens.subject, subject_token_type: JWT_TYPE, audience, scope }
}

// A result of genericGrantRequest with its helper, as plain JSON.
function plain(result) {
  return { ...result, expiresIn: result.expiresIn() }
}

// ClientAuth functions (openid-client's public type, shared with oauth4webapi) for the two ways a
// workload authenticates with its JWT-SVID here; the library has no built-in jwt-spiffe method.
function SpiffeJwt(svid) {
  return (_as, c, body) => {
    body.set('client_id', c.client_id)
    body.set('client_assertion_type', JWT_SPIFFE)
    body.set('client_assertion', svid)
  }
}

function SpiffeBearer(svid) {
  return (_as, c, body, headers) => {
    body.set('client_id', c.client_id)
    headers.set('authorization', `Bearer ${svid}`)
  }
}

const features = {
  async discovery(input, step) {
    const config = await step('discovery', () => discover(input, input.agent))
    if (config) await step('server_metadata', () => config.serverMetadata())
    // Without allowInsecureRequests the library refuses the http:// issuer: its rule, not ours.
    await step('discovery_without_allowInsecureRequests', () =>
      client.discovery(new URL(input.issuer), input.agent, undefined, undefined, { algorithm: 'oauth2' }),
    )
    // Its default is OpenID Connect discovery (/.well-known/openid-configuration); we are no OP.
    await step('discovery_oidc_default', () =>
      client.discovery(new URL(input.issuer), input.agent, undefined, undefined, {
        execute: [client.allowInsecureRequests],
      }),
    )
  },

  async exchange(input, step) {
    const config = await discover(input, input.agent, undefined, client.None())
    await step('exchange', async () =>
      plain(await client.genericGrantRequest(config, GRANT, exchangeParameters(input))),
    )
    await step('exchange_data', async () =>
      plain(await client.genericGrantRequest(config, GRANT, exchangeParameters(input, 'data:crm', 'read'))),
    )
  },

  async errors(input, step) {
    const config = await discover(input, input.agent, undefined, client.None())
    await step('unknown_audience', () =>
      client.genericGrantRequest(config, GRANT, exchangeParameters(input, 'tool:nope')),
    )
    await step('scope_not_offered', () =>
      client.genericGrantRequest(config, GRANT, exchangeParameters(input, 'tool:calc', 'invoke admin')),
    )
    const other = await discover(input, 'spiffe://example.org/other', undefined, client.None())
    await step('client_id_not_the_subject', () =>
      client.genericGrantRequest(other, GRANT, exchangeParameters(input)),
    )
  },

  async dpop(input, step) {
    const config = await discover(input, input.agent, undefined, client.None())
    const keyPair = await client.randomDPoPKeyPair(input.alg)
    const DPoP = client.getDPoPHandle(config, keyPair)
    await step('exchange', async () =>
      plain(await client.genericGrantRequest(config, GRANT, exchangeParameters(input), { DPoP })),
    )
    await step('thumbprint', () => DPoP.calculateThumbprint())
    await step('thumbprint_jose', async () =>
      calculateJwkThumbprint(await crypto.subtle.exportKey('jwk', keyPair.publicKey)),
    )
  },

  async mtls(input, step) {
    const log = []
    const customFetch = recordingFetch(log, { ca: input.ca, cert: input.client_cert, key: input.client_key })
    const config = await discover(
      input,
      input.agent,
      { use_mtls_endpoint_aliases: true },
      client.TlsClientAuth(),
      {
        [client.customFetch]: customFetch,
      },
    )
    await step('exchange', async () =>
      plain(await client.genericGrantRequest(config, GRANT, exchangeParameters(input))),
    )
    await step('requests', () => log)
    await step('certificate_thumbprint', () => certificateThumbprint(input.client_cert))
  },

  async introspection(input, step) {
    const agent = await discover(input, input.agent, undefined, client.None())
    const token = (await client.genericGrantRequest(agent, GRANT, exchangeParameters(input))).access_token
    const rsBearer = await discover(
      input,
      input.resource_server,
      undefined,
      SpiffeBearer(input.tokens.resource_server),
    )
    const rsAssertion = await discover(
      input,
      input.resource_server,
      undefined,
      SpiffeJwt(input.tokens.resource_server),
    )
    const log = []
    const rsMtls = await discover(
      input,
      input.resource_server,
      { use_mtls_endpoint_aliases: true },
      client.TlsClientAuth(),
      {
        [client.customFetch]: recordingFetch(log, { ca: input.ca, cert: input.rs_cert, key: input.rs_key }),
      },
    )
    await step('introspect_bearer', () => client.tokenIntrospection(rsBearer, token))
    await step('introspect_client_assertion', () => client.tokenIntrospection(rsAssertion, token))
    await step('introspect_mtls', () => client.tokenIntrospection(rsMtls, token))
    await step('mtls_requests', () => log)
    const rsNone = await discover(input, input.resource_server, undefined, client.None())
    await step('introspect_unauthenticated', () => client.tokenIntrospection(rsNone, token))
    const holder = await discover(input, input.agent, undefined, SpiffeJwt(input.tokens.holder))
    await step('revoke_by_holder', () => client.tokenRevocation(holder, token))
    await step('introspect_after_revocation', () => client.tokenIntrospection(rsAssertion, token))
  },
}

await run((input, step) => features[input.feature](input, step))
