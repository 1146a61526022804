import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Where the Twarga service answers, relative to the Jupyter server's base URL. */
export const API_NAMESPACE = 'twarga/api';

/**
 * An error from the Twarga API, carrying what the server said.
 *
 * `status` is 0 when the server could not be reached at all.
 */
export class TwargaAPIError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly reason: string,
    readonly field: string | null = null
  ) {
    super(message);
    this.name = 'TwargaAPIError';
  }

  /** Whether the service is down (unreachable or answering 502/503/504) rather than refusing. */
  get serviceDown(): boolean {
    return (
      this.status === 0 ||
      this.status === 502 ||
      this.status === 503 ||
      this.status === 504
    );
  }
}

/**
 * Call the Twarga REST API and decode its JSON answer.
 *
 * Goes through `ServerConnection.makeRequest`, which adds the XSRF header and the
 * authentication the page already has; errors come back as `TwargaAPIError` with the
 * server's `message`, `reason` and `field` (422 and some 400 answers).
 *
 * @param path Path under `twarga/api`, e.g. `vms` or `vms/3/action`
 * @param init Fetch options; a plain object `body` is not accepted: pass a JSON string
 * @param settings Server settings (defaults to the page's)
 */
export async function requestAPI<T>(
  path: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_NAMESPACE, path);
  const headers = new Headers(init.headers);
  if (init.body !== undefined && !headers.has('Content-Type')) {
    headers.set('Content-Type', 'application/json');
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(
      url,
      { ...init, headers },
      settings
    );
  } catch (error) {
    const detail = error instanceof Error ? error.message : String(error);
    throw new TwargaAPIError(
      `the Jupyter server cannot be reached (${detail})`,
      0,
      'network_error'
    );
  }
  const text = await response.text();
  let data: any = undefined;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      data = undefined;
    }
  }
  if (!response.ok) {
    const message =
      (data && typeof data.message === 'string' && data.message) ||
      `${response.status} ${response.statusText || 'error'}`;
    const reason =
      (data && typeof data.reason === 'string' && data.reason) || 'http_error';
    const field =
      (data && typeof data.field === 'string' && data.field) || null;
    throw new TwargaAPIError(message, response.status, reason, field);
  }
  return data as T;
}

/** A JSON body for `requestAPI`. */
export function jsonBody(method: string, body: unknown): RequestInit {
  return { method, body: JSON.stringify(body) };
}
