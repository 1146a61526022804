/**
 * requestAPI against a mocked `ServerConnection.makeRequest`: the URL it asks, the
 * headers it adds and how the server's errors come back.
 */
import { ServerConnection } from '@jupyterlab/services';

import { jsonBody, requestAPI, TwargaAPIError } from '../handler';

const settings = ServerConnection.makeSettings({
  baseUrl: 'http://127.0.0.1:8888/user/alice/'
});

function answer(status: number, body: string, statusText = ''): Response {
  return new Response(body || null, { status, statusText });
}

/** The error `promise` rejects with; fails the test if it resolves. */
async function failure(promise: Promise<unknown>): Promise<TwargaAPIError> {
  const result = await promise.then(
    () => null,
    (error: TwargaAPIError) => error
  );
  if (result === null) {
    throw new Error('the request was expected to fail');
  }
  return result;
}

let makeRequest: jest.SpyInstance;

beforeEach(() => {
  makeRequest = jest.spyOn(ServerConnection, 'makeRequest');
});

afterEach(() => {
  jest.restoreAllMocks();
});

describe('requestAPI', () => {
  it('asks under twarga/api of the base URL and decodes the JSON answer', async () => {
    makeRequest.mockResolvedValue(answer(200, '{"credits": 1000}'));

    const me = await requestAPI<{ credits: number }>('me', {}, settings);

    expect(me.credits).toBe(1000);
    const [url, init] = makeRequest.mock.calls[0];
    expect(url).toBe('http://127.0.0.1:8888/user/alice/twarga/api/me');
    expect(new Headers(init.headers).has('Content-Type')).toBe(false);
  });

  it('sends a JSON body as JSON', async () => {
    makeRequest.mockResolvedValue(answer(201, '{"id": 3, "name": "web-1"}'));

    await requestAPI('vms', jsonBody('POST', { name: 'web-1' }), settings);

    const [url, init] = makeRequest.mock.calls[0];
    expect(url).toBe('http://127.0.0.1:8888/user/alice/twarga/api/vms');
    expect(init.method).toBe('POST');
    expect(init.body).toBe('{"name":"web-1"}');
    expect(new Headers(init.headers).get('Content-Type')).toBe(
      'application/json'
    );
  });

  it('answers undefined for an empty body (204)', async () => {
    makeRequest.mockResolvedValue(answer(204, ''));
    await expect(
      requestAPI('vms/3', { method: 'DELETE' }, settings)
    ).resolves.toBeUndefined();
  });

  it("passes on the server's message, reason and field", async () => {
    makeRequest.mockResolvedValue(
      answer(
        422,
        JSON.stringify({
          message: 'ram must be at most 8192',
          reason: 'invalid',
          field: 'ram'
        })
      )
    );

    const error = await failure(requestAPI('vms', {}, settings));

    expect(error).toBeInstanceOf(TwargaAPIError);
    expect(error.message).toBe('ram must be at most 8192');
    expect(error.status).toBe(422);
    expect(error.reason).toBe('invalid');
    expect(error.field).toBe('ram');
    expect(error.serviceDown).toBe(false);
  });

  it('names the status when the error is not JSON, and a 502 is an outage', async () => {
    makeRequest.mockResolvedValue(
      answer(502, '<html>proxy error</html>', 'Bad Gateway')
    );

    const error = await failure(requestAPI('me', {}, settings));

    expect(error.message).toBe('502 Bad Gateway');
    expect(error.reason).toBe('http_error');
    expect(error.field).toBeNull();
    expect(error.serviceDown).toBe(true);
  });

  it('turns a network failure into status 0', async () => {
    makeRequest.mockRejectedValue(
      new ServerConnection.NetworkError(new TypeError('Failed to fetch'))
    );

    const error = await failure(requestAPI('me', {}, settings));

    expect(error).toBeInstanceOf(TwargaAPIError);
    expect(error.status).toBe(0);
    expect(error.reason).toBe('network_error');
    expect(error.message).toContain('cannot be reached');
    expect(error.serviceDown).toBe(true);
  });
});
