/**
 * Labs in the side panel: VMs grouped under their lab (name, template, status, networks
 * with their cidr, each VM's segment addresses), the lab's start / stop / destroy, the
 * idle-stop line of a running VM, and the "New lab" dialog. The panel runs on a
 * `TwargaModel` whose `requestAPI` is an in-memory API; the dialog goes through the real
 * `requestAPI` with the browser's `fetch` mocked.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { formatIdleStop } from '../format';
import { requestAPI, TwargaAPIError } from '../handler';
import { TwargaModel } from '../model';
import { NewLabDialog, NewLabForm } from '../newlab';
import { groupByLab, TwargaPanel } from '../panel';
import { ILab, IVM } from '../types';

jest.mock('../handler', () => {
  const actual = jest.requireActual('../handler');
  return { ...actual, requestAPI: jest.fn(actual.requestAPI) };
});
jest.mock('@jupyterlab/apputils', () => {
  const actual = jest.requireActual('@jupyterlab/apputils');
  return { ...actual, showDialog: jest.fn() };
});

const mockedRequest = requestAPI as jest.MockedFunction<typeof requestAPI>;
const mockedDialog = showDialog as jest.MockedFunction<typeof showDialog>;
const realRequest = jest.requireActual('../handler')
  .requestAPI as typeof requestAPI;

/** 14:05 today in the browser's time zone, as the service sends it (UTC, ISO 8601). */
const AT_1405 = new Date(2026, 11, 3, 14, 5, 0).toISOString();

function vm(id: number, name: string, extra: Partial<IVM> = {}): IVM {
  return {
    id,
    name,
    owner: 'alice',
    status: 'running',
    status_message: null,
    image: 'twarga/tiny',
    os_type: 'linux',
    ram: 128,
    cpu: 1,
    disk: 1,
    ip_address: null,
    ssh_host: '127.0.0.1',
    ssh_port: 22000 + id,
    domain: `twarga-alice-${name}`,
    created_at: '2026-12-03T06:00:00Z',
    started_at: '2026-12-03T06:00:00Z',
    uptime: 30,
    lab_id: null,
    lab_name: null,
    addresses: {},
    idle_stop_at: null,
    ...extra
  };
}

function lab(extra: Partial<ILab> = {}): ILab {
  return {
    id: 3,
    name: 'mine',
    owner: 'alice',
    template: 'attack-defend',
    status: 'running',
    deployment_id: null,
    created_at: '2026-12-03T06:00:00Z',
    networks: [{ name: 'lan', cidr: '10.77.0.0/24' }],
    vms: [
      {
        id: 12,
        name: 'mine-attacker',
        machine: 'attacker',
        status: 'running',
        ssh_port: 22012,
        addresses: { lan: '10.77.0.11' },
        idle_stop_at: null
      },
      {
        id: 13,
        name: 'mine-target',
        machine: 'target',
        status: 'running',
        ssh_port: 22013,
        addresses: { lan: '10.77.0.12' },
        idle_stop_at: null
      }
    ],
    ...extra
  };
}

function labVM(id: number, name: string, address: string): IVM {
  return vm(id, name, {
    lab_id: 3,
    lab_name: 'mine',
    machine: name.replace('mine-', ''),
    addresses: { lan: address }
  });
}

describe('groupByLab', () => {
  it("puts each lab's VMs under it and leaves plain VMs as they are", () => {
    const vms = [
      vm(1, 'web-1'),
      labVM(12, 'mine-attacker', '10.77.0.11'),
      vm(2, 'db-1'),
      labVM(13, 'mine-target', '10.77.0.12'),
      // A VM of a lab the labs list does not have (yet): shown as a plain VM.
      vm(20, 'other-a', { lab_id: 9, lab_name: 'other' })
    ];
    const { labs, plain } = groupByLab([lab()], vms);
    expect(labs.map(group => group.lab.name)).toEqual(['mine']);
    expect(labs[0].vms.map(item => [item.name, item.addresses?.lan])).toEqual([
      ['mine-attacker', '10.77.0.11'],
      ['mine-target', '10.77.0.12']
    ]);
    // The full VM of GET vms, not the lab JSON's short one.
    expect(labs[0].vms[0].image).toBe('twarga/tiny');
    expect(plain.map(item => item.name)).toEqual(['web-1', 'db-1', 'other-a']);
  });

  it('shows a lab VM the VM list does not have yet from the lab JSON', () => {
    const { labs, plain } = groupByLab([lab()], [vm(1, 'web-1')]);
    expect(labs[0].vms.map(item => [item.name, item.status])).toEqual([
      ['mine-attacker', 'running'],
      ['mine-target', 'running']
    ]);
    expect(labs[0].vms[1].addresses).toEqual({ lan: '10.77.0.12' });
    expect(plain.map(item => item.name)).toEqual(['web-1']);
  });
});

describe('formatIdleStop', () => {
  it('says when a running VM will be stopped if it stays idle', () => {
    expect(formatIdleStop({ status: 'running', idle_stop_at: AT_1405 })).toBe(
      'stops when idle at 14:05'
    );
  });

  it('says nothing without a time, for a stopped VM, or for a bad time', () => {
    expect(
      formatIdleStop({ status: 'running', idle_stop_at: null })
    ).toBeNull();
    expect(formatIdleStop({ status: 'running' })).toBeNull();
    expect(
      formatIdleStop({ status: 'stopped', idle_stop_at: AT_1405 })
    ).toBeNull();
    expect(
      formatIdleStop({ status: 'running', idle_stop_at: 'soon' })
    ).toBeNull();
  });
});

describe('TwargaPanel labs', () => {
  let vms: IVM[];
  let labs: ILab[];
  let calls: { method: string; path: string; body: any }[];
  let actionError: TwargaAPIError | null;
  let model: TwargaModel;
  let panel: TwargaPanel;
  let newLab: jest.Mock;

  async function api(path: string, init: RequestInit = {}): Promise<unknown> {
    const method = init.method ?? 'GET';
    const body =
      typeof init.body === 'string' ? JSON.parse(init.body) : undefined;
    calls.push({ method, path, body });
    if (path === 'me') {
      return {
        name: 'alice',
        admin: false,
        credits: 1000,
        quota: { max_vms: 5, max_ram_mb: 8192 },
        usage: { vms: 3, ram_mb: 384, cpu: 3, disk_gb: 3 }
      };
    }
    if (path === 'images') {
      return [];
    }
    if (path === 'vms') {
      return vms;
    }
    if (path === 'labs') {
      return labs;
    }
    const action = /^labs\/(\d+)\/action$/.exec(path);
    if (action && method === 'POST') {
      if (actionError) {
        throw actionError;
      }
      const status =
        body.action === 'stop'
          ? 'stopped'
          : body.action === 'destroy'
            ? 'destroyed'
            : 'running';
      const vmStatus = status === 'stopped' ? 'stopped' : 'running';
      labs = labs.map(item =>
        item.id === Number(action[1])
          ? {
              ...item,
              status,
              vms: item.vms.map(v => ({ ...v, status: vmStatus }))
            }
          : item
      );
      const answer = labs.find(item => item.id === Number(action[1]));
      vms = vms
        .filter(v => status !== 'destroyed' || v.lab_id !== answer?.id)
        .map(v => (v.lab_id === answer?.id ? { ...v, status: vmStatus } : v));
      labs = labs.filter(item => item.status !== 'destroyed');
      return answer;
    }
    throw new TwargaAPIError(`no route ${method} ${path}`, 404, 'not_found');
  }

  async function settle(): Promise<void> {
    for (let i = 0; i < 5; i++) {
      await jest.advanceTimersByTimeAsync(20);
    }
  }

  function $(selector: string, root: ParentNode = panel.node): HTMLElement {
    const found = root.querySelector(selector);
    if (!found) {
      throw new Error(`no ${selector} in the panel`);
    }
    return found as HTMLElement;
  }

  function text(selector: string, root: ParentNode = panel.node): string[] {
    return Array.from(root.querySelectorAll(selector)).map(
      node => node.textContent ?? ''
    );
  }

  function confirm(accept: boolean): void {
    mockedDialog.mockResolvedValueOnce({
      button: accept
        ? Dialog.warnButton({ label: 'Destroy' })
        : Dialog.cancelButton(),
      isChecked: null,
      value: null
    });
  }

  beforeEach(async () => {
    jest.useFakeTimers();
    vms = [
      vm(1, 'web-1', { idle_stop_at: AT_1405 }),
      labVM(12, 'mine-attacker', '10.77.0.11'),
      labVM(13, 'mine-target', '10.77.0.12')
    ];
    labs = [lab()];
    calls = [];
    actionError = null;
    mockedRequest.mockReset();
    mockedRequest.mockImplementation(api as typeof requestAPI);
    mockedDialog.mockReset();
    newLab = jest.fn();
    model = new TwargaModel({ interval: 1000, standby: 'never' });
    panel = new TwargaPanel({ model, openConsole: () => undefined, newLab });
    Widget.attach(panel, document.body);
    await settle();
  });

  afterEach(() => {
    panel.dispose();
    model.dispose();
    jest.useRealTimers();
  });

  it('groups VMs under their lab with its template, status, networks and addresses', () => {
    const group = $('.twarga-lab');
    expect(group.dataset.labName).toBe('mine');
    expect($('.twarga-lab-name', group).textContent).toBe('mine');
    expect($('.twarga-lab-status', group).textContent).toBe('running');
    expect($('.twarga-lab-template', group).textContent).toBe(
      'template attack-defend'
    );
    expect($('.twarga-lab-networks', group).textContent).toBe(
      'networks lan 10.77.0.0/24'
    );
    expect(text('.twarga-lab-vms .twarga-vm-name', group)).toEqual([
      'mine-attacker',
      'mine-target'
    ]);
    expect(text('.twarga-lab-vms .twarga-vm-addresses', group)).toEqual([
      'lan 10.77.0.11',
      'lan 10.77.0.12'
    ]);
    // The plain VM stays in the plain list, without a lab or addresses.
    expect(text('.twarga-vm-list > .twarga-vm .twarga-vm-name')).toEqual([
      'web-1'
    ]);
    expect(
      $('.twarga-vm-list .twarga-vm-addresses').hidden &&
        $('.twarga-vm-list .twarga-vm-addresses').textContent
    ).toBe('');
    expect(model.labs.map(item => item.name)).toEqual(['mine']);
  });

  it('shows when a running VM will be stopped if it stays idle', async () => {
    const plain = $('.twarga-vm[data-vm-name="web-1"]');
    expect($('.twarga-vm-idle', plain).hidden).toBe(false);
    expect($('.twarga-vm-idle', plain).textContent).toBe(
      'stops when idle at 14:05'
    );
    // Lab VMs without a time have no such line.
    const attacker = $('.twarga-vm[data-vm-name="mine-attacker"]');
    expect($('.twarga-vm-idle', attacker).hidden).toBe(true);

    // Once stopped (or the time is gone) the line goes away.
    vms = vms.map(item =>
      item.id === 1 ? { ...item, status: 'stopped', idle_stop_at: null } : item
    );
    await jest.advanceTimersByTimeAsync(1000);
    await settle();
    expect($('.twarga-vm-idle', plain).hidden).toBe(true);
    expect($('.twarga-vm-idle', plain).textContent).toBe('');
  });

  it('stops, starts and destroys the whole lab', async () => {
    const group = $('.twarga-lab');
    const button = (action: string) =>
      $(`[data-lab-action="${action}"]`, group) as HTMLButtonElement;
    expect(button('start').disabled).toBe(true);
    expect(button('stop').disabled).toBe(false);

    button('stop').click();
    await settle();
    expect(calls).toContainEqual({
      method: 'POST',
      path: 'labs/3/action',
      body: { action: 'stop' }
    });
    expect($('.twarga-lab-status', group).textContent).toBe('stopped');
    expect(text('.twarga-vm-status', group)).toEqual(['stopped', 'stopped']);
    expect(button('start').disabled).toBe(false);

    button('start').click();
    await settle();
    expect($('.twarga-lab-status', group).textContent).toBe('running');

    // Destroy asks first; "Cancel" sends nothing.
    confirm(false);
    button('destroy').click();
    await settle();
    expect(mockedDialog.mock.calls[0][0]?.title).toBe('Destroy lab mine?');
    expect(calls.filter(call => call.body?.action === 'destroy')).toEqual([]);

    confirm(true);
    button('destroy').click();
    await settle();
    expect(calls).toContainEqual({
      method: 'POST',
      path: 'labs/3/action',
      body: { action: 'destroy' }
    });
    expect(panel.node.querySelector('.twarga-lab')).toBeNull();
    expect(text('.twarga-vm .twarga-vm-name')).toEqual(['web-1']);
  });

  it("shows the service's refusal of a lab action under the lab", async () => {
    actionError = new TwargaAPIError(
      'not enough credits to start lab mine',
      402,
      'insufficient_credits'
    );
    const group = $('.twarga-lab');
    $('[data-lab-action="stop"]', group).click();
    await settle();
    expect($('.twarga-lab-error', group).hidden).toBe(false);
    expect($('.twarga-lab-error', group).textContent).toBe(
      'not enough credits to start lab mine'
    );
  });

  it('opens the new lab dialog from its button', () => {
    $('[data-action="new-lab"]').click();
    expect(newLab).toHaveBeenCalledTimes(1);
  });

  it('shows VMs ungrouped when the service has no labs API', async () => {
    labs = [];
    mockedRequest.mockImplementation(((path: string, init?: RequestInit) =>
      path === 'labs'
        ? Promise.reject(new TwargaAPIError('Not Found', 404, 'not_found'))
        : api(path, init)) as typeof requestAPI);
    const fresh = new TwargaModel({ interval: 1000, standby: 'never' });
    const other = new TwargaPanel({
      model: fresh,
      openConsole: () => undefined
    });
    Widget.attach(other, document.body);
    await settle();
    expect(other.node.querySelector('.twarga-lab')).toBeNull();
    expect(text('.twarga-vm-list .twarga-vm-name', other.node)).toEqual([
      'web-1',
      'mine-attacker',
      'mine-target'
    ]);
    // Their addresses still show.
    expect(text('.twarga-vm-list .twarga-vm-addresses', other.node)).toEqual([
      '',
      'lan 10.77.0.11',
      'lan 10.77.0.12'
    ]);
    expect(other.node.querySelector('[data-action="new-lab"]')).toBeNull();
    other.dispose();
    fresh.dispose();
  });
});

describe('the New lab dialog', () => {
  const TEMPLATES = [
    {
      schema: 'twarga-lab-template/v1',
      name: 'attack-defend',
      title: 'Attacker and target',
      description: 'An attacker and a target on one segment',
      networks: [{ name: 'lan', cidr: '10.77.0.0/24' }],
      machines: [
        { name: 'attacker', image: 'twarga/tiny' },
        { name: 'target', image: 'twarga/tiny' }
      ],
      machines_count: 2,
      vm_count: 2
    },
    {
      schema: 'twarga-lab-template/v1',
      name: 'web-db',
      title: 'Web server and database',
      networks: [{ name: 'back', cidr: '10.78.0.0/24' }],
      machines: [
        { name: 'web', image: 'twarga/tiny' },
        { name: 'db', image: 'twarga/tiny' }
      ],
      machines_count: 2,
      vm_count: 2
    }
  ];

  let fetchMock: jest.Mock;
  let posted: { url: string; body: any }[];
  let refusal: { status: number; body: unknown } | null;
  let model: TwargaModel;
  let savedFetch: typeof fetch;

  function json(status: number, body: unknown): Response {
    return new Response(JSON.stringify(body), {
      status,
      headers: { 'Content-Type': 'application/json' }
    });
  }

  beforeEach(() => {
    posted = [];
    refusal = null;
    // The real requestAPI, down to the browser's fetch.
    mockedRequest.mockReset();
    mockedRequest.mockImplementation(realRequest);
    fetchMock = jest.fn(async (input: RequestInfo, init?: RequestInit) => {
      const request = input instanceof Request ? input : null;
      const url = request ? request.url : String(input);
      const method = request ? request.method : (init?.method ?? 'GET');
      const path = new URL(url, 'http://localhost/').pathname;
      if (path.endsWith('/twarga/api/lab-templates')) {
        return json(200, TEMPLATES);
      }
      if (path.endsWith('/twarga/api/labs') && method === 'POST') {
        const body = JSON.parse(
          request ? await request.text() : String(init?.body)
        );
        posted.push({ url: path, body });
        if (refusal) {
          return json(refusal.status, refusal.body);
        }
        return json(201, lab({ name: body.name, status: 'pending' }));
      }
      return json(404, { message: 'not here', reason: 'not_found' });
    });
    savedFetch = globalThis.fetch;
    globalThis.fetch = fetchMock as unknown as typeof fetch;
    // Its poll is never started: only the dialog's requests go out.
    model = new TwargaModel({ interval: 600000, standby: 'never' });
  });

  afterEach(() => {
    globalThis.fetch = savedFetch;
    model.dispose();
    document.body.replaceChildren();
  });

  function templates(form: NewLabForm): string[] {
    return Array.from(
      form.node.querySelectorAll('.twarga-newlab-template')
    ).map(node => (node as HTMLElement).textContent ?? '');
  }

  it('lists the templates and makes a lab from the chosen one', async () => {
    const form = new NewLabForm({ model });
    Widget.attach(form, document.body);
    await form.load();
    expect(templates(form)).toEqual([
      'attack-defend — Attacker and target (2 VMs; lan 10.77.0.0/24)' +
        'An attacker and a target on one segment',
      'web-db — Web server and database (2 VMs; back 10.78.0.0/24)'
    ]);
    // The first is chosen and names the lab until a name is typed.
    expect(form.template).toBe('attack-defend');
    expect(form.nameInput.value).toBe('attack-defend');

    const webDb = form.node.querySelector(
      'input[value="web-db"]'
    ) as HTMLInputElement;
    webDb.click();
    expect(form.template).toBe('web-db');
    form.nameInput.value = 'shop';
    form.nameInput.dispatchEvent(new Event('input'));

    const made = await form.create();
    expect(posted).toEqual([
      { url: '/twarga/api/labs', body: { template: 'web-db', name: 'shop' } }
    ]);
    expect(made?.name).toBe('shop');
    expect(form.getValue()?.name).toBe('shop');
    expect(
      (form.node.querySelector('.twarga-newlab-status') as HTMLElement)
        .textContent
    ).toBe('Lab shop is pending: its VMs show in the Twarga Lab panel.');
    // The model has it at once: the panel groups its VMs without waiting for a poll.
    expect(model.labs.map(item => item.name)).toEqual(['shop']);
    await model.refresh();
    form.dispose();
  });

  it("shows the service's message when it refuses, and a bad name before asking", async () => {
    const form = new NewLabForm({ model });
    Widget.attach(form, document.body);
    await form.load();
    const error = () =>
      form.node.querySelector('.twarga-newlab-error') as HTMLElement;

    form.nameInput.value = 'Not A Name';
    expect(await form.create()).toBeNull();
    expect(error().hidden).toBe(false);
    expect(error().textContent).toContain('lower-case letters');
    expect(posted).toEqual([]);

    refusal = {
      status: 409,
      body: {
        message: 'the lab needs 2 VMs, your quota allows 1 more',
        reason: 'quota_exceeded'
      }
    };
    form.nameInput.value = 'mine';
    expect(await form.create()).toBeNull();
    expect(posted.map(item => item.body)).toEqual([
      { template: 'attack-defend', name: 'mine' }
    ]);
    expect(error().hidden).toBe(false);
    expect(error().textContent).toBe(
      'the lab needs 2 VMs, your quota allows 1 more'
    );
    expect(form.nameInput.getAttribute('aria-invalid')).toBe('true');
    expect(model.labs).toEqual([]);
    form.dispose();
  });

  it('says so when the templates cannot be listed', async () => {
    fetchMock.mockImplementation(async () =>
      json(503, { message: 'the service is restarting', reason: 'down' })
    );
    const form = new NewLabForm({ model });
    await form.load();
    expect(
      (form.node.querySelector('.twarga-newlab-empty') as HTMLElement)
        .textContent
    ).toBe('The lab templates cannot be listed: the service is restarting');
    form.dispose();
  });

  it('stays open on a refusal and resolves with the lab once it is made', async () => {
    refusal = {
      status: 409,
      body: { message: "you already have a lab 'mine'", reason: 'name_taken' }
    };
    const opened = NewLabDialog.open({ model });
    const dialog = await waitFor(() =>
      document.body.querySelector('.twarga-newlab-dialog')
    );
    await waitFor(() =>
      dialog.querySelectorAll('.twarga-newlab-template').length === 2
        ? true
        : null
    );
    const name = dialog.querySelector(
      'input[name="lab-name"]'
    ) as HTMLInputElement;
    name.value = 'mine';
    const create = Array.from(dialog.querySelectorAll('button')).find(
      button => button.textContent === 'Create lab'
    ) as HTMLButtonElement;
    create.click();
    await waitFor(() =>
      dialog.querySelector('.twarga-newlab-error')?.textContent ? true : null
    );
    expect(dialog.querySelector('.twarga-newlab-error')?.textContent).toBe(
      "you already have a lab 'mine'"
    );
    expect(document.body.contains(dialog)).toBe(true);

    refusal = null;
    name.value = 'mine-2';
    create.click();
    const made = await opened;
    expect(made?.name).toBe('mine-2');
    expect(posted.map(item => item.body.name)).toEqual(['mine', 'mine-2']);
    expect(document.body.contains(dialog)).toBe(false);
    // The model polls again after a lab is made: let that end before it is disposed.
    await model.refresh();
  });
});

/** Poll `probe` until it gives something (real timers), failing after two seconds. */
async function waitFor<T>(probe: () => T | null | undefined): Promise<T> {
  const deadline = Date.now() + 2000;
  for (;;) {
    const found = probe();
    if (found) {
      return found;
    }
    if (Date.now() > deadline) {
      throw new Error('waited two seconds in vain');
    }
    await new Promise(resolve => setTimeout(resolve, 10));
  }
}
