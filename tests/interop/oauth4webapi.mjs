// panva/oauth4webapi v3 against our issuer, used as its documentation shows; see test_npm_clients.py.
// Features (input.feature): discovery, exchange, errors, dpop, mtls, mtls_dpop, introspection,
// revocation_by_non_holder.

import * as oauth from 'oauth4webapi'
import { calculateJwkThumbprint } from 'jose'
import {
  GRANT,
  JWT_SPIFFE,
  JWT_TYPE,
  certificateThumbprint,
  claimsOf,
  recordingFetch,
  run,
} from './common.mjs'

const insecure = { [oauth.allowInsecureRequests]: true } // the issuer is http://127.0.0.1 (loopback tests)

async function discover(issuer) {
  const url = new URL(issuer)
  const response = await oauth.discoveryRequest(url, { ...insecure, algorithm: 'oauth2' })
  return oauth.processDiscoveryResponse(url, response)
}

function exchangeParameters(input, audience = 'tool:calc', scope = 'invoke') {
  return {
    subject_token: input.tokens.subject,
    subject_token_type: JWT_TYPE,
    audience,
    scope,
  }
}

async function exchange(as, client, auth, parameters, options = {}) {
  const response = await oauth.genericTokenEndpointRequest(as, client, auth, GRANT, parameters, {
    ...insecure,
    ...options,
  })
  return oauth.processGenericTokenEndpointResponse(as, client, response)
}

// A ClientAuth (the library's public extension type) for draft-ietf-oauth-spiffe-client-auth: the
// JWT-SVID itself is the assertion. The built-in PrivateKeyJwt cannot do this (see `errors`).
function SpiffeJwt(svid) {
  return (_as, client, body) => {
    body.set('client_id', client.client_id)
    body.set('client_assertion_type', JWT_SPIFFE)
    body.set('client_assertion', svid)
  }
}

// A ClientAuth presenting the JWT-SVID as a Bearer token, the other form our form endpoints accept.
// (The library refuses an authorization header in options.headers; a ClientAuth may set it.)
function SpiffeBearer(svid) {
  return (_as, client, body, headers) => {
    body.set('client_id', client.client_id)
    headers.set('authorization', `Bearer ${svid}`)
  }
}

async function introspect(as, client, auth, token, options = {}) {
  const response = await oauth.introspectionRequest(as, client, auth, token, { ...insecure, ...options })
  return oauth.processIntrospectionResponse(as, client, response)
}

const features = {
  async discovery(input, step) {
    await step('discovery', () => discover(input.issuer))
    // Without the option the library refuses a plain-HTTP issuer: its rule, not ours.
    await step('discovery_without_allowInsecureRequests', async () =>
      oauth.processDiscoveryResponse(
        new URL(input.issuer),
        await oauth.discoveryRequest(new URL(input.issuer), { algorithm: 'oauth2' }),
      ),
    )
    // RFC 8414 §3: the TLS listener serves the same issuer's document.
    const log = []
    await step('discovery_on_tls_listener', async () =>
      oauth.processDiscoveryResponse(
        new URL(input.issuer),
        await oauth.discoveryRequest(new URL(input.tls_url), {
          algorithm: 'oauth2',
          [oauth.customFetch]: recordingFetch(log, { ca: input.ca }),
        }),
      ),
    )
    await step('tls_requests', () => log)
  },

  async exchange(input, step) {
    const as = await discover(input.issuer)
    const client = { client_id: input.agent }
    await step('exchange', () => exchange(as, client, oauth.None(), exchangeParameters(input)))
    await step('exchange_data', () =>
      exchange(as, client, oauth.None(), exchangeParameters(input, 'data:crm', 'read')),
    )
  },

  async errors(input, step) {
    const as = await discover(input.issuer)
    const client = { client_id: input.agent }
    await step('unknown_audience', () =>
      exchange(as, client, oauth.None(), exchangeParameters(input, 'tool:nope')),
    )
    await step('scope_not_offered', () =>
      exchange(as, client, oauth.None(), exchangeParameters(input, 'tool:calc', 'invoke admin')),
    )
    await step('client_id_not_the_subject', () =>
      exchange(as, { client_id: 'spiffe://example.org/other' }, oauth.None(), exchangeParameters(input)),
    )
    // The library's own assertion method signs a fresh JWT and hard-codes the jwt-bearer type
    // (RFC 7523), so it cannot carry a JWT-SVID as a jwt-spiffe assertion: the server says which.
    await step('private_key_jwt_is_jwt_bearer', async () => {
      const { privateKey } = await oauth.generateKeyPair('ES256')
      return exchange(as, client, oauth.PrivateKeyJwt(privateKey), exchangeParameters(input))
    })
  },

  async dpop(input, step) {
    const as = await discover(input.issuer)
    const client = { client_id: input.agent }
    const keyPair = await oauth.generateKeyPair(input.alg)
    const DPoP = oauth.DPoP(client, keyPair)
    const result = await step('exchange', () =>
      exchange(as, client, oauth.None(), exchangeParameters(input), { DPoP }),
    )
    await step('thumbprint', () => DPoP.calculateThumbprint())
    await step('thumbprint_jose', async () =>
      calculateJwkThumbprint(await crypto.subtle.exportKey('jwk', keyPair.publicKey)),
    )
    if (!result) return
    // The resource server's side, same library: the client's DPoP request to a tool (proof with ath)
    // is captured instead of sent, then checked as RFC 9068 + RFC 9449 §7 prescribe.
    let captured
    const capture = async (url, options) => {
      captured = new Request(url, options)
      return new Response('{}', { status: 200, headers: { 'content-type': 'application/json' } })
    }
    await oauth.protectedResourceRequest(
      result.access_token,
      'POST',
      new URL('https://calc.tools.internal/invoke'),
      new Headers(),
      null,
      { DPoP, [oauth.customFetch]: capture },
    )
    await step('resource_request', () => ({
      authorization_scheme: captured.headers.get('authorization').split(' ')[0],
      proof_claims: claimsOf(captured.headers.get('dpop')),
    }))
    await step('validate_jwt_access_token', () =>
      oauth.validateJwtAccessToken(as, captured, 'tool:calc', insecure),
    )
    // RFC 9449 §6.2: introspection tells the resource server the token is DPoP-bound, and to what.
    await step('introspect', () =>
      introspect(
        as,
        { client_id: input.resource_server },
        SpiffeJwt(input.tokens.resource_server),
        result.access_token,
      ),
    )
  },

  async mtls(input, step) {
    const as = await discover(input.issuer)
    const client = { client_id: input.agent, use_mtls_endpoint_aliases: true }
    const log = []
    const customFetch = recordingFetch(log, { ca: input.ca, cert: input.client_cert, key: input.client_key })
    const result = await step('exchange', () =>
      exchange(as, client, oauth.TlsClientAuth(), exchangeParameters(input), {
        [oauth.customFetch]: customFetch,
      }),
    )
    await step('requests', () => log)
    await step('certificate_thumbprint', () => certificateThumbprint(input.client_cert))
    if (!result) return
    // The library's resource-server helper knows only DPoP confirmation (its documented scope).
    const request = new Request('https://calc.tools.internal/invoke', {
      method: 'POST',
      headers: { authorization: `Bearer ${result.access_token}` },
    })
    await step('validate_jwt_access_token', () =>
      oauth.validateJwtAccessToken(as, request, 'tool:calc', insecure),
    )
    // RFC 8705 §3.2: introspection gives the resource server the certificate's thumbprint.
    await step('introspect', () =>
      introspect(
        as,
        { client_id: input.resource_server },
        SpiffeJwt(input.tokens.resource_server),
        result.access_token,
      ),
    )
  },

  // Both sender constraints a client may pick, at once: DPoP on the mTLS alias with a client certificate.
  async mtls_dpop(input, step) {
    const as = await discover(input.issuer)
    const client = { client_id: input.agent, use_mtls_endpoint_aliases: true }
    const log = []
    const customFetch = recordingFetch(log, { ca: input.ca, cert: input.client_cert, key: input.client_key })
    const DPoP = oauth.DPoP(client, await oauth.generateKeyPair('ES256'))
    const result = await step('exchange', () =>
      exchange(as, client, oauth.TlsClientAuth(), exchangeParameters(input), {
        DPoP,
        [oauth.customFetch]: customFetch,
      }),
    )
    await step('requests', () => log)
    await step('thumbprint', () => DPoP.calculateThumbprint())
    if (!result) return
    let captured
    const capture = async (url, options) => {
      captured = new Request(url, options)
      return new Response('{}', { status: 200, headers: { 'content-type': 'application/json' } })
    }
    await oauth.protectedResourceRequest(
      result.access_token,
      'POST',
      new URL('https://calc.tools.internal/invoke'),
      new Headers(),
      null,
      { DPoP, [oauth.customFetch]: capture },
    )
    await step('validate_jwt_access_token', () =>
      oauth.validateJwtAccessToken(as, captured, 'tool:calc', insecure),
    )
  },

  async introspection(input, step) {
    const as = await discover(input.issuer)
    const agent = { client_id: input.agent }
    const issued = await exchange(as, agent, oauth.None(), exchangeParameters(input))
    const token = issued.access_token
    const rs = { client_id: input.resource_server }
    await step('introspect_bearer_in_options_headers', () =>
      introspect(as, rs, oauth.None(), token, {
        headers: { authorization: `Bearer ${input.tokens.resource_server}` },
      }),
    )
    await step('introspect_bearer', () =>
      introspect(as, rs, SpiffeBearer(input.tokens.resource_server), token),
    )
    await step('introspect_client_assertion', () =>
      introspect(as, rs, SpiffeJwt(input.tokens.resource_server), token),
    )
    const log = []
    const customFetch = recordingFetch(log, { ca: input.ca, cert: input.rs_cert, key: input.rs_key })
    await step('introspect_mtls', () =>
      introspect(as, { ...rs, use_mtls_endpoint_aliases: true }, oauth.TlsClientAuth(), token, {
        [oauth.customFetch]: customFetch,
      }),
    )
    await step('mtls_requests', () => log)
    await step('introspect_unauthenticated', () => introspect(as, rs, oauth.None(), token))
    await step('revoke_by_holder', async () =>
      oauth.processRevocationResponse(
        await oauth.revocationRequest(as, agent, SpiffeJwt(input.tokens.holder), token, insecure),
      ),
    )
    await step('introspect_after_revocation', () =>
      introspect(as, rs, SpiffeJwt(input.tokens.resource_server), token),
    )
  },

  // RFC 7009 §2.1: a client may revoke only tokens issued to it; the resource server is not the holder.
  async revocation_by_non_holder(input, step) {
    const as = await discover(input.issuer)
    const issued = await exchange(as, { client_id: input.agent }, oauth.None(), exchangeParameters(input))
    const rs = { client_id: input.resource_server }
    await step('revoke_by_resource_server', async () =>
      oauth.processRevocationResponse(
        await oauth.revocationRequest(
          as,
          rs,
          SpiffeJwt(input.tokens.resource_server),
          issued.access_token,
          insecure,
        ),
      ),
    )
    await step('introspect_afterwards', () =>
      introspect(as, rs, SpiffeJwt(input.tokens.resource_server), issued.access_token),
    )
  },
}

await run((input, step) => features[input.feature](input, step))
