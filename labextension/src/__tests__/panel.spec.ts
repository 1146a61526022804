/**
 * The side panel's snapshots section in jsdom, on a `TwargaModel` whose `requestAPI` is
 * a small in-memory API and with JupyterLab's `showDialog` answered by the test.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { requestAPI, TwargaAPIError } from '../handler';
import { TwargaModel } from '../model';
import { TwargaPanel } from '../panel';
import { IVM, IVMSnapshot } from '../types';

jest.mock('../handler', () => {
  const actual = jest.requireActual('../handler');
  return { ...actual, requestAPI: jest.fn() };
});
jest.mock('@jupyterlab/apputils', () => {
  const actual = jest.requireActual('@jupyterlab/apputils');
  return { ...actual, showDialog: jest.fn() };
});

const mockedRequest = requestAPI as jest.MockedFunction<typeof requestAPI>;
const mockedDialog = showDialog as jest.MockedFunction<typeof showDialog>;

const VM: IVM = {
  id: 1,
  name: 'web-1',
  owner: 'alice',
  status: 'stopped',
  status_message: null,
  image: 'twarga/tiny',
  os_type: 'linux',
  ram: 512,
  cpu: 1,
  disk: 1,
  ip_address: null,
  ssh_host: null,
  ssh_port: null,
  domain: 'twarga-alice-web-1',
  created_at: '2026-01-01T00:00:00Z',
  started_at: null,
  uptime: 0
};

let vms: IVM[];
let snapshots: IVMSnapshot[];
let calls: string[];
let model: TwargaModel;
let panel: TwargaPanel;

async function api(path: string, init: RequestInit = {}): Promise<unknown> {
  const method = init.method ?? 'GET';
  const body =
    typeof init.body === 'string' ? JSON.parse(init.body) : undefined;
  calls.push(`${method} ${path}`);
  if (path === 'me') {
    return {
      name: 'alice',
      admin: false,
      credits: 1000,
      quota: { max_vms: 5, max_ram_mb: 8192 },
      usage: { vms: 1, ram_mb: 512, cpu: 1, disk_gb: 1 }
    };
  }
  if (path === 'images') {
    return [];
  }
  if (path === 'vms') {
    return vms;
  }
  if (path === 'vms/1/snapshots' && method === 'GET') {
    return snapshots;
  }
  if (path === 'vms/1/snapshots' && method === 'POST') {
    if (snapshots.some(s => s.name === body.name)) {
      throw new TwargaAPIError(
        `VM web-1 already has a snapshot ${body.name}`,
        409,
        'duplicate_name'
      );
    }
    const taken = {
      name: body.name,
      created_at: '2026-01-02T03:04:05+00:00',
      state: 'shutoff'
    };
    snapshots = [...snapshots, taken];
    return taken;
  }
  const one = /^vms\/1\/snapshots\/(.+)$/.exec(path);
  if (one && method === 'POST') {
    vms = [{ ...vms[0], status: 'running' }];
    return vms[0];
  }
  if (one && method === 'DELETE') {
    snapshots = snapshots.filter(s => s.name !== one[1]);
    return undefined;
  }
  throw new TwargaAPIError(`no route ${method} ${path}`, 404, 'not_found');
}

/** Let the model's requests and the panel's handlers run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) {
    await jest.advanceTimersByTimeAsync(20);
  }
}

function answer(accept: boolean): void {
  mockedDialog.mockResolvedValueOnce({
    button: accept
      ? Dialog.warnButton({ label: 'Yes' })
      : Dialog.cancelButton(),
    isChecked: null,
    value: null
  });
}

function $(selector: string): HTMLElement {
  const found = panel.node.querySelector(selector);
  if (!found) {
    throw new Error(`no ${selector} in the panel`);
  }
  return found as HTMLElement;
}

function listed(): string[] {
  return Array.from(
    panel.node.querySelectorAll('.twarga-snapshot .twarga-snapshot-name')
  ).map(node => node.textContent ?? '');
}

beforeEach(async () => {
  jest.useFakeTimers();
  vms = [VM];
  snapshots = [];
  calls = [];
  mockedRequest.mockReset();
  mockedRequest.mockImplementation(api as typeof requestAPI);
  mockedDialog.mockReset();
  model = new TwargaModel({ interval: 1000, standby: 'never' });
  panel = new TwargaPanel({ model, openConsole: () => undefined });
  // In the document: a detached form is not submitted.
  Widget.attach(panel, document.body);
  await settle();
});

afterEach(() => {
  panel.dispose();
  model.dispose();
  jest.useRealTimers();
});

describe('TwargaPanel snapshots', () => {
  it("shows the chosen VM's snapshots and takes one", async () => {
    const section = $('.twarga-snapshots');
    expect(section.hidden).toBe(true);

    $('.twarga-vm [data-action="snapshots"]').click();
    await settle();
    expect(section.hidden).toBe(false);
    expect(panel.selectedVM).toBe(1);
    expect($('.twarga-snapshots .twarga-section-title').textContent).toBe(
      'Snapshots of web-1'
    );
    expect($('.twarga-snapshots-empty').textContent).toBe(
      'No snapshots yet: take one below.'
    );

    // No name: said so, nothing asked.
    $('[data-action="take-snapshot"]').click();
    await settle();
    expect($('.twarga-snapshots-error').textContent).toContain(
      'Give the snapshot a name'
    );
    expect(calls).not.toContain('POST vms/1/snapshots');

    ($('input[name="snapshot-name"]') as HTMLInputElement).value = 's1';
    $('[data-action="take-snapshot"]').click();
    await settle();
    expect(listed()).toEqual(['s1']);
    expect($('.twarga-snapshot .twarga-snapshot-state').textContent).toBe(
      'shutoff'
    );
    expect($('.twarga-snapshots-status').textContent).toBe(
      'Snapshot s1 of web-1 was taken.'
    );
    expect($('.twarga-snapshots-error').hidden).toBe(true);

    // The service's refusal shows under the list.
    ($('input[name="snapshot-name"]') as HTMLInputElement).value = 's1';
    $('[data-action="take-snapshot"]').click();
    await settle();
    expect($('.twarga-snapshots-error').hidden).toBe(false);
    expect($('.twarga-snapshots-error').textContent).toBe(
      'VM web-1 already has a snapshot s1'
    );
    expect(listed()).toEqual(['s1']);
  });

  it('reverts and deletes only after the dialog says yes', async () => {
    snapshots = [
      { name: 's1', created_at: '2026-01-01T00:00:00+00:00', state: 'running' }
    ];
    $('.twarga-vm [data-action="snapshots"]').click();
    await settle();
    expect(listed()).toEqual(['s1']);

    answer(false);
    $('[data-action="revert-snapshot"]').click();
    await settle();
    expect(mockedDialog.mock.calls[0][0]?.title).toBe('Revert web-1 to s1?');
    expect(calls).not.toContain('POST vms/1/snapshots/s1');

    answer(true);
    $('[data-action="revert-snapshot"]').click();
    await settle();
    expect(calls).toContain('POST vms/1/snapshots/s1');
    expect($('.twarga-snapshots-status').textContent).toBe(
      'web-1 was reverted to s1: it is running.'
    );
    expect($('.twarga-vm .twarga-vm-status').textContent).toBe('running');

    answer(true);
    $('[data-action="delete-snapshot"]').click();
    await settle();
    expect(mockedDialog.mock.calls[2][0]?.title).toBe('Delete snapshot s1?');
    expect(calls).toContain('DELETE vms/1/snapshots/s1');
    expect(listed()).toEqual([]);
    expect($('.twarga-snapshots-empty').hidden).toBe(false);
  });

  it('hides the section when its VM is gone', async () => {
    $('.twarga-vm [data-action="snapshots"]').click();
    await settle();
    vms = [];
    await jest.advanceTimersByTimeAsync(1000);
    await settle();
    expect(panel.selectedVM).toBeNull();
    expect($('.twarga-snapshots').hidden).toBe(true);
    expect(model.watchedVM).toBeNull();
  });
});
