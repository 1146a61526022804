/**
 * TwargaModel against a fake Twarga API: `requestAPI` is replaced by a router that
 * answers `me`, `vms`, `images`, the actions and the snapshots from in-memory state, and
 * the poll's timers are jest's fake timers.
 */
import { requestAPI, TwargaAPIError } from '../handler';
import { TwargaModel } from '../model';
import { IImage, IMe, IVM, IVMSnapshot } from '../types';

jest.mock('../handler', () => {
  const actual = jest.requireActual('../handler');
  return { ...actual, requestAPI: jest.fn() };
});

const mockedRequest = requestAPI as jest.MockedFunction<typeof requestAPI>;

/** Long enough for the fake timers to run the first tick (a timeout, then a frame). */
const FIRST_TICK_MS = 50;
const INTERVAL = 1000;
/** The longest wait: lumino's Poll raises any `max` under 30 s to 30 s. */
const MAX_INTERVAL = 30000;

function vm(id: number, name: string, status: IVM['status'] = 'running'): IVM {
  return {
    id,
    name,
    owner: 'alice',
    status,
    status_message: null,
    image: 'twarga/tiny',
    os_type: 'linux',
    ram: 512,
    cpu: 1,
    disk: 1,
    ip_address: null,
    ssh_host: '127.0.0.1',
    ssh_port: 2200 + id,
    domain: `twarga-alice-${name}`,
    created_at: '2026-01-01T00:00:00Z',
    started_at: '2026-01-01T00:00:00Z',
    uptime: 10
  };
}

const IMAGES: IImage[] = [
  {
    name: 'twarga/tiny',
    kind: 'kernel',
    os_type: 'linux',
    description: 'BusyBox'
  }
];

/** The server behind the mocked `requestAPI`: its state, what it was asked, its failures. */
class FakeServer {
  me: IMe = {
    name: 'alice',
    admin: false,
    credits: 1000,
    quota: { max_vms: 5, max_ram_mb: 8192 },
    usage: { vms: 0, ram_mb: 0, cpu: 0, disk_gb: 0 }
  };
  vms: IVM[] = [];
  /** Thrown for every request while set: the service is down. */
  outage: unknown = null;
  /** Thrown for `images` while set. */
  imagesError: unknown = null;
  /** Thrown for `POST vms` while set. */
  createError: unknown = null;
  /** Each VM's snapshots, oldest first. */
  snapshots = new Map<number, IVMSnapshot[]>();
  /** Thrown for every snapshot request while set. */
  snapshotError: unknown = null;
  /** Resolves a snapshot list while set: the answer is held back until the test says. */
  holdList: Promise<void> | null = null;
  calls: { path: string; method: string; body: unknown; at: number }[] = [];

  last(): FakeServer['calls'][number] {
    return this.calls[this.calls.length - 1];
  }

  count(path: string): number {
    return this.calls.filter(call => call.path === path).length;
  }

  async handle(path: string, init: RequestInit = {}): Promise<unknown> {
    const method = init.method ?? 'GET';
    const body =
      typeof init.body === 'string' ? JSON.parse(init.body) : undefined;
    this.calls.push({ path, method, body, at: Date.now() });
    if (this.outage) {
      throw this.outage;
    }
    if (path === 'me') {
      return this.me;
    }
    if (path === 'images') {
      if (this.imagesError) {
        throw this.imagesError;
      }
      return IMAGES;
    }
    if (path === 'vms' && method === 'GET') {
      return this.vms;
    }
    if (path === 'vms' && method === 'POST') {
      if (this.createError) {
        throw this.createError;
      }
      const created = vm(this.vms.length + 1, body.name, 'starting');
      this.vms = [...this.vms, created];
      return created;
    }
    const action = /^vms\/(\d+)\/action$/.exec(path);
    if (action && method === 'POST') {
      const id = Number(action[1]);
      const status = body.action === 'stop' ? 'stopped' : 'running';
      this.vms = this.vms.map(item =>
        item.id === id ? { ...item, status } : item
      );
      return this.vms.find(item => item.id === id);
    }
    const snapshots = /^vms\/(\d+)\/snapshots(?:\/([^/]+))?$/.exec(path);
    if (snapshots) {
      return this.snapshot(
        Number(snapshots[1]),
        snapshots[2] === undefined ? null : decodeURIComponent(snapshots[2]),
        method,
        body
      );
    }
    const one = /^vms\/(\d+)$/.exec(path);
    if (one && method === 'DELETE') {
      this.vms = this.vms.filter(item => item.id !== Number(one[1]));
      return undefined;
    }
    throw new TwargaAPIError(`no route ${method} ${path}`, 404, 'not_found');
  }

  private async snapshot(
    id: number,
    name: string | null,
    method: string,
    body: any
  ): Promise<unknown> {
    const found = this.vms.find(item => item.id === id);
    if (!found) {
      throw new TwargaAPIError(`no VM ${id}`, 404, 'no_vm');
    }
    if (this.snapshotError) {
      throw this.snapshotError;
    }
    const list = this.snapshots.get(id) ?? [];
    if (name === null && method === 'GET') {
      const answer = [...list];
      if (this.holdList) {
        await this.holdList;
      }
      return answer;
    }
    if (name === null && method === 'POST') {
      if (list.some(item => item.name === body.name)) {
        throw new TwargaAPIError(
          `VM ${found.name} already has a snapshot ${body.name}`,
          409,
          'duplicate_name'
        );
      }
      const taken: IVMSnapshot = {
        name: body.name,
        created_at: '2026-01-02T03:04:05+00:00',
        state: found.status === 'running' ? 'running' : 'shutoff'
      };
      this.snapshots.set(id, [...list, taken]);
      return taken;
    }
    const known = list.find(item => item.name === name);
    if (!known) {
      throw new TwargaAPIError(
        `VM ${found.name} has no snapshot ${name}`,
        404,
        'no_snapshot'
      );
    }
    if (method === 'POST' && body.action === 'revert') {
      const status = known.state === 'running' ? 'running' : 'stopped';
      this.vms = this.vms.map(item =>
        item.id === id ? { ...item, status } : item
      );
      return this.vms.find(item => item.id === id);
    }
    if (method === 'DELETE') {
      this.snapshots.set(
        id,
        list.filter(item => item.name !== name)
      );
      return undefined;
    }
    throw new TwargaAPIError(`no route ${method} snapshot`, 404, 'not_found');
  }
}

function taken(name: string, state = 'running'): IVMSnapshot {
  return { name, created_at: '2026-01-01T00:00:00+00:00', state };
}

let server: FakeServer;
let model: TwargaModel | null;

function newModel(): TwargaModel {
  model = new TwargaModel({
    interval: INTERVAL,
    maxInterval: MAX_INTERVAL,
    standby: 'never'
  });
  return model;
}

/** How often `changed` fired. */
function changes(target: TwargaModel): { count: number } {
  const seen = { count: 0 };
  target.changed.connect(() => {
    seen.count += 1;
  });
  return seen;
}

beforeEach(() => {
  jest.useFakeTimers();
  server = new FakeServer();
  mockedRequest.mockReset();
  mockedRequest.mockImplementation(((path: string, init?: RequestInit) =>
    server.handle(path, init)) as typeof requestAPI);
  model = null;
});

afterEach(() => {
  model?.dispose();
  jest.useRealTimers();
  jest.restoreAllMocks();
});

describe('TwargaModel polling', () => {
  it('loads me, my VMs and the images on its first poll', async () => {
    server.vms = [vm(1, 'web-1')];
    const model = newModel();
    const seen = changes(model);
    expect(model.loaded).toBe(false);

    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);

    expect(model.loaded).toBe(true);
    expect(model.me?.credits).toBe(1000);
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);
    expect(model.images.map(image => image.name)).toEqual(['twarga/tiny']);
    expect(model.serviceError).toBeNull();
    expect(seen.count).toBe(1);
  });

  it('polls every interval and fetches the images only until it has them', async () => {
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(server.count('me')).toBe(1);

    server.vms = [vm(1, 'web-1')];
    server.me = { ...server.me, credits: 990 };
    await jest.advanceTimersByTimeAsync(INTERVAL);

    expect(server.count('me')).toBe(2);
    expect(server.count('vms')).toBe(2);
    expect(server.count('images')).toBe(1);
    expect(model.me?.credits).toBe(990);
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);

    await jest.advanceTimersByTimeAsync(3 * INTERVAL);
    expect(server.count('me')).toBe(5);
    expect(server.count('images')).toBe(1);
  });

  it('shows the VMs when the image list fails, and asks for the images again', async () => {
    server.vms = [vm(1, 'web-1')];
    server.imagesError = new TwargaAPIError('boom', 500, 'internal');
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);

    expect(model.serviceError).toBeNull();
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);
    expect(model.images).toEqual([]);

    server.imagesError = null;
    await jest.advanceTimersByTimeAsync(INTERVAL);
    expect(server.count('images')).toBe(2);
    expect(model.images.map(image => image.name)).toEqual(['twarga/tiny']);
  });

  it('stops polling once disposed', async () => {
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    model.dispose();
    const asked = server.calls.length;

    await jest.advanceTimersByTimeAsync(10 * INTERVAL);
    expect(model.isDisposed).toBe(true);
    expect(server.calls.length).toBe(asked);
    await model.refresh(); // a no-op once disposed
    expect(server.calls.length).toBe(asked);
  });
});

describe('TwargaModel outages', () => {
  it('reports an outage, keeps the last answer and recovers', async () => {
    server.vms = [vm(1, 'web-1')];
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    const seen = changes(model);

    server.outage = new TwargaAPIError(
      'the Jupyter server cannot be reached (Failed to fetch)',
      0,
      'network_error'
    );
    await jest.advanceTimersByTimeAsync(INTERVAL);

    expect(model.serviceError).toBe(
      'Twarga Lab cannot be reached: the Jupyter server is not answering.'
    );
    expect(seen.count).toBe(1);
    // What the service said last is still shown (the status bar says "offline" next to it).
    expect(model.me?.credits).toBe(1000);
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);

    server.outage = null;
    // The first wait after a failure is at most three intervals.
    await jest.advanceTimersByTimeAsync(3 * INTERVAL);
    expect(model.serviceError).toBeNull();
    expect(model.loaded).toBe(true);
  });

  it('backs off while the service is down, never beyond the longest wait', async () => {
    // The backoff is random between the interval and three times the last wait: take the top.
    jest.spyOn(Math, 'random').mockReturnValue(0.999);
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    server.outage = new TwargaAPIError('Service Unavailable', 503, 'down');
    await jest.advanceTimersByTimeAsync(INTERVAL);
    expect(model.serviceError).not.toBeNull();
    const failedAt = server.calls.filter(call => call.path === 'me').length;

    await jest.advanceTimersByTimeAsync(5 * MAX_INTERVAL);

    const tries = server.calls
      .filter(call => call.path === 'me')
      .slice(failedAt - 1)
      .map(call => call.at);
    const waits = tries.slice(1).map((at, index) => at - tries[index]);
    // Not another try at the usual interval: each wait is longer than the one before
    // (2998, 8987, 26934 ms here) until the longest wait, which it then keeps.
    expect(waits.length).toBeGreaterThanOrEqual(4);
    expect(waits[0]).toBeGreaterThan(INTERVAL);
    expect(waits[0]).toBeLessThanOrEqual(3 * INTERVAL);
    waits.slice(1).forEach((wait, index) => {
      expect(wait).toBeGreaterThanOrEqual(waits[index]);
      expect(wait).toBeLessThanOrEqual(MAX_INTERVAL);
    });
    expect(waits[waits.length - 1]).toBe(MAX_INTERVAL);
  });

  it.each([
    [
      new TwargaAPIError('Not Found', 404, 'not_found'),
      'Twarga Lab is not running on this Jupyter server.'
    ],
    [
      new TwargaAPIError('Unauthorized', 401, 'unauthorized'),
      'You are not signed in to Twarga Lab (Unauthorized).'
    ],
    [
      new TwargaAPIError('Forbidden', 403, 'forbidden'),
      'You are not signed in to Twarga Lab (Forbidden).'
    ],
    [
      new TwargaAPIError('the twarga service is down.', 502, 'bad_gateway'),
      'Twarga Lab is unavailable: the twarga service is down.'
    ],
    [
      new TwargaAPIError('database is locked.', 500, 'internal'),
      'Twarga Lab answered with an error: database is locked.'
    ],
    [new Error('weird'), 'Twarga Lab cannot be reached: Error: weird.']
  ])('says why for %s', async (error, sentence) => {
    server.outage = error;
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.loaded).toBe(false);
    expect(model.serviceError).toBe(sentence);
  });
});

describe('TwargaModel actions', () => {
  it('creates a VM: it is listed at once, then as the server has it', async () => {
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    const seen = changes(model);

    const created = await model.createVM({ name: 'web-1', ram: 512 });

    expect(created.name).toBe('web-1');
    expect(server.last()).toMatchObject({
      path: 'vms',
      method: 'POST',
      body: { name: 'web-1', ram: 512 }
    });
    expect(model.vms.map(item => [item.name, item.status])).toEqual([
      ['web-1', 'starting']
    ]);
    expect(seen.count).toBeGreaterThanOrEqual(1);

    // It also polls at once to pick up the new usage and status.
    server.vms = [{ ...server.vms[0], status: 'running' }];
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.vms.map(item => item.status)).toEqual(['running']);
  });

  it('passes a refusal on with its field and leaves the list alone', async () => {
    server.vms = [vm(1, 'web-1')];
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    server.createError = new TwargaAPIError(
      "you already have a VM named 'web-1'",
      409,
      'conflict',
      'name'
    );

    const refused = model.createVM({ name: 'web-1' });

    await expect(refused).rejects.toBeInstanceOf(TwargaAPIError);
    await expect(refused).rejects.toMatchObject({
      status: 409,
      field: 'name'
    });
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);
    expect(model.serviceError).toBeNull();
  });

  it('stops a VM in place and destroys one', async () => {
    server.vms = [vm(1, 'web-1'), vm(2, 'db-1')];
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);

    const stopped = await model.act(2, 'stop');
    expect(stopped.status).toBe('stopped');
    expect(server.last()).toMatchObject({
      path: 'vms/2/action',
      method: 'POST',
      body: { action: 'stop' }
    });
    expect(model.vms.map(item => [item.name, item.status])).toEqual([
      ['web-1', 'running'],
      ['db-1', 'stopped']
    ]);

    await model.destroyVM(1);
    expect(server.last()).toMatchObject({
      path: 'vms/1',
      method: 'DELETE'
    });
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.vms.map(item => item.name)).toEqual(['db-1']);
  });
});

describe('TwargaModel snapshots', () => {
  it("lists the watched VM's snapshots at once and on every poll", async () => {
    server.vms = [vm(1, 'web-1'), vm(2, 'db-1')];
    server.snapshots.set(1, [taken('s1')]);
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(server.count('vms/1/snapshots')).toBe(0);
    expect(model.snapshotsOf(1)).toBeNull();

    await model.watchSnapshots(1);
    expect(model.watchedVM).toBe(1);
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s1']);
    expect(server.count('vms/1/snapshots')).toBe(1);

    // Taken elsewhere (a notebook): the next poll shows it.
    server.snapshots.set(1, [taken('s1'), taken('s2', 'shutoff')]);
    await jest.advanceTimersByTimeAsync(INTERVAL);
    expect(model.snapshotsOf(1)?.map(s => [s.name, s.state])).toEqual([
      ['s1', 'running'],
      ['s2', 'shutoff']
    ]);
    expect(server.count('vms/2/snapshots')).toBe(0);

    await model.watchSnapshots(null);
    const asked = server.count('vms/1/snapshots');
    await jest.advanceTimersByTimeAsync(2 * INTERVAL);
    expect(server.count('vms/1/snapshots')).toBe(asked);
  });

  it('takes a snapshot: it is listed at once, then as the server has it', async () => {
    server.vms = [vm(1, 'web-1')];
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    await model.watchSnapshots(1);
    expect(model.snapshotsOf(1)).toEqual([]);
    const seen = changes(model);

    const snapshot = await model.takeSnapshot(1, 'before-upgrade');

    expect(snapshot).toMatchObject({
      name: 'before-upgrade',
      state: 'running'
    });
    expect(
      server.calls.find(
        call => call.method === 'POST' && call.path === 'vms/1/snapshots'
      )
    ).toMatchObject({ body: { name: 'before-upgrade' } });
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['before-upgrade']);
    expect(seen.count).toBeGreaterThanOrEqual(1);
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.snapshotsOf(1)?.map(s => s.created_at)).toEqual([
      '2026-01-02T03:04:05+00:00'
    ]);
  });

  it('passes a refusal on with its reason and keeps the list', async () => {
    server.vms = [vm(1, 'web-1')];
    server.snapshots.set(1, [taken('s1')]);
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    await model.watchSnapshots(1);

    const refused = model.takeSnapshot(1, 's1');
    await expect(refused).rejects.toBeInstanceOf(TwargaAPIError);
    await expect(refused).rejects.toMatchObject({
      status: 409,
      reason: 'duplicate_name',
      message: 'VM web-1 already has a snapshot s1'
    });
    await expect(model.deleteSnapshot(1, 'nope')).rejects.toMatchObject({
      status: 404,
      reason: 'no_snapshot'
    });
    await expect(model.revertSnapshot(1, 'nope')).rejects.toMatchObject({
      status: 404,
      reason: 'no_snapshot'
    });
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s1']);
    expect(model.serviceError).toBeNull();
  });

  it('reverts a VM to a snapshot and updates the VM in place', async () => {
    server.vms = [vm(1, 'web-1', 'running')];
    server.snapshots.set(1, [taken('cold', 'shutoff')]);
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);

    const reverted = await model.revertSnapshot(1, 'cold');

    expect(reverted.status).toBe('stopped');
    expect(server.last()).toMatchObject({
      path: 'vms/1/snapshots/cold',
      method: 'POST',
      body: { action: 'revert' }
    });
    expect(model.vms.map(item => item.status)).toEqual(['stopped']);
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.vms.map(item => item.status)).toEqual(['stopped']);
  });

  it('deletes a snapshot and encodes its name in the path', async () => {
    server.vms = [vm(1, 'web-1')];
    server.snapshots.set(1, [taken('a b'), taken('s2')]);
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    await model.watchSnapshots(1);

    await model.deleteSnapshot(1, 'a b');

    expect(server.calls.find(call => call.method === 'DELETE')?.path).toBe(
      'vms/1/snapshots/a%20b'
    );
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s2']);
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s2']);
  });

  it('keeps why the list failed, without calling the service down', async () => {
    server.vms = [vm(1, 'web-1', 'pending')];
    server.snapshotError = new TwargaAPIError(
      'VM web-1 is still being created',
      409,
      'vm_pending'
    );
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);

    await model.watchSnapshots(1);
    expect(model.snapshotsOf(1)).toBeNull();
    expect(model.snapshotError(1)).toBe('VM web-1 is still being created');
    await jest.advanceTimersByTimeAsync(INTERVAL);
    expect(model.serviceError).toBeNull();
    expect(model.vms.map(item => item.name)).toEqual(['web-1']);

    server.snapshotError = null;
    server.snapshots.set(1, [taken('s1')]);
    await jest.advanceTimersByTimeAsync(INTERVAL);
    expect(model.snapshotError(1)).toBeNull();
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s1']);
  });

  it('does not let a poll that was in flight undo a change', async () => {
    server.vms = [vm(1, 'web-1')];
    const model = newModel();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    await model.watchSnapshots(1);

    // A poll asks for the list (empty) and its answer is held back ...
    let release: () => void = () => undefined;
    server.holdList = new Promise<void>(resolve => {
      release = resolve;
    });
    await jest.advanceTimersByTimeAsync(INTERVAL);
    const polls = server.count('vms/1/snapshots');
    // ... while a snapshot is taken (its own reload is held back too).
    await model.takeSnapshot(1, 's1');
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s1']);

    server.holdList = null;
    release();
    await jest.advanceTimersByTimeAsync(FIRST_TICK_MS);
    expect(server.count('vms/1/snapshots')).toBeGreaterThan(polls);
    expect(model.snapshotsOf(1)?.map(s => s.name)).toEqual(['s1']);
  });
});
