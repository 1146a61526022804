/**
 * The "booting…" / "ready" label of the side panel's VM rows in jsdom, on a `TwargaModel`
 * whose `requestAPI` answers from an in-memory VM list the test changes between polls.
 */
import { Widget } from '@lumino/widgets';

import { readiness } from '../format';
import { requestAPI, TwargaAPIError } from '../handler';
import { TwargaModel } from '../model';
import { TwargaPanel } from '../panel';
import { IVM } from '../types';

jest.mock('../handler', () => {
  const actual = jest.requireActual('../handler');
  return { ...actual, requestAPI: jest.fn() };
});

const mockedRequest = requestAPI as jest.MockedFunction<typeof requestAPI>;

const RUNNING: IVM = {
  id: 1,
  name: 'web-1',
  owner: 'alice',
  status: 'running',
  status_message: null,
  image: 'debian/12',
  os_type: 'linux',
  ram: 1024,
  cpu: 1,
  disk: 10,
  ip_address: '10.0.2.15',
  ssh_host: '127.0.0.1',
  ssh_port: 22001,
  domain: 'twarga-alice-web-1',
  created_at: '2026-01-01T00:00:00Z',
  started_at: '2026-01-01T00:00:05Z',
  uptime: 12,
  ready: false
};

/** A VM as a service from before `ready` lists it. */
function withoutReady(vm: IVM): IVM {
  const old = { ...vm };
  delete old.ready;
  return old;
}

let vms: IVM[];
let opened: string[];
let model: TwargaModel;
let panel: TwargaPanel;

async function api(path: string, init: RequestInit = {}): Promise<unknown> {
  const method = init.method ?? 'GET';
  if (path === 'me') {
    return {
      name: 'alice',
      admin: false,
      credits: 1000,
      quota: { max_vms: 5, max_ram_mb: 8192 },
      usage: { vms: vms.length, ram_mb: 1024, cpu: 1, disk_gb: 10 }
    };
  }
  if (path === 'images') {
    return [];
  }
  if (path === 'vms') {
    return vms;
  }
  throw new TwargaAPIError(`no route ${method} ${path}`, 404, 'not_found');
}

/** Let the model's requests and the panel's rendering run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) {
    await jest.advanceTimersByTimeAsync(20);
  }
}

/** The next poll of the model (its interval is 1 s here). */
async function poll(): Promise<void> {
  await jest.advanceTimersByTimeAsync(1000);
  await settle();
}

function row(name = 'web-1'): HTMLElement {
  const found = panel.node.querySelector(`.twarga-vm[data-vm-name="${name}"]`);
  if (!found) {
    throw new Error(`no row of ${name} in the panel`);
  }
  return found as HTMLElement;
}

function label(name = 'web-1'): HTMLElement {
  return row(name).querySelector('.twarga-vm-ready') as HTMLElement;
}

function consoleButton(name = 'web-1'): HTMLButtonElement {
  return row(name).querySelector(
    '[data-action="console"]'
  ) as HTMLButtonElement;
}

beforeEach(async () => {
  jest.useFakeTimers();
  vms = [RUNNING];
  opened = [];
  mockedRequest.mockReset();
  mockedRequest.mockImplementation(api as typeof requestAPI);
  model = new TwargaModel({ interval: 1000, standby: 'never' });
  panel = new TwargaPanel({
    model,
    openConsole: vm => opened.push(vm.name)
  });
  Widget.attach(panel, document.body);
  await settle();
});

afterEach(() => {
  panel.dispose();
  model.dispose();
  jest.useRealTimers();
});

describe('readiness', () => {
  it('is booting, ready, or nothing when the VM is not running', () => {
    expect(readiness(RUNNING)).toBe('booting');
    expect(readiness({ ...RUNNING, ready: true })).toBe('ready');
    expect(readiness({ ...RUNNING, status: 'stopped' })).toBeNull();
    expect(readiness({ ...RUNNING, status: 'starting' })).toBeNull();
    // A service from before "ready": a running VM counts as ready.
    expect(readiness(withoutReady(RUNNING))).toBe('ready');
  });
});

describe('TwargaPanel VM rows', () => {
  it('show "booting…" until the guest reports in, with the console usable', async () => {
    expect(row().querySelector('.twarga-vm-status')?.textContent).toBe(
      'running'
    );
    expect(label().hidden).toBe(false);
    expect(label().textContent).toBe('booting…');
    expect(label().classList).toContain('twarga-ready-booting');
    expect(label().title).toContain('still starting');
    expect(row().dataset.ready).toBe('false');
    // The console shows the boot: it can be opened before the guest is ready.
    expect(consoleButton().disabled).toBe(false);
    consoleButton().click();
    expect(opened).toEqual(['web-1']);

    vms = [{ ...RUNNING, ready: true, uptime: 30 }];
    await poll();
    expect(label().textContent).toBe('ready');
    expect(label().classList).toContain('twarga-ready-ready');
    expect(label().classList).not.toContain('twarga-ready-booting');
    expect(row().dataset.ready).toBe('true');
    expect(consoleButton().disabled).toBe(false);
  });

  it('show nothing when the VM is not running, and "ready" without the field', async () => {
    vms = [{ ...RUNNING, status: 'stopped', ready: false, uptime: 0 }];
    await poll();
    expect(row().querySelector('.twarga-vm-status')?.textContent).toBe(
      'stopped'
    );
    expect(label().hidden).toBe(true);
    expect(label().textContent).toBe('');
    expect(row().dataset.ready).toBeUndefined();
    expect(consoleButton().disabled).toBe(true);

    // Started by a service that does not send "ready" yet.
    vms = [
      withoutReady(RUNNING),
      { ...RUNNING, id: 2, name: 'db-1', ready: false }
    ];
    await poll();
    expect(label().hidden).toBe(false);
    expect(label().textContent).toBe('ready');
    expect(label('db-1').textContent).toBe('booting…');
    expect(consoleButton().disabled).toBe(false);
    expect(consoleButton('db-1').disabled).toBe(false);
  });
});
