import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { jsonBody, requestAPI, TwargaAPIError } from './handler';
import {
  ICreateLab,
  ICreateVM,
  IImage,
  ILab,
  ILabTemplate,
  IMe,
  IVM,
  IVMSnapshot,
  LabAction,
  VMAction
} from './types';

/** What one poll brings back. */
interface IPollAnswer {
  me: IMe;
  vms: IVM[];
  images: IImage[] | null;
  /** My labs (null when they could not be listed: a service without labs). */
  labs: ILab[] | null;
  /** The watched VM's snapshots (null when none is watched). */
  snapshots: ISnapshotAnswer | null;
}

/** The watched VM's snapshots as one poll found them. */
interface ISnapshotAnswer {
  vmId: number;
  /** The list's version when the request went out (a later change wins over it). */
  version: number;
  snapshots: IVMSnapshot[] | null;
  error: string | null;
}

/**
 * The one owner of Twarga state in the browser: polls `me` and `vms` (and `images`
 * until it has them), emits `changed`, and performs the user's actions.
 *
 * Views (side panel, status bar) only render it; they never call the API themselves.
 * The snapshots of one VM (the one `watchSnapshots` names) are polled as well.
 */
export class TwargaModel implements IDisposable {
  constructor(options: TwargaModel.IOptions = {}) {
    this._poll = new Poll<IPollAnswer, unknown>({
      factory: () => this._fetch(),
      frequency: {
        interval: options.interval ?? 3000,
        backoff: true,
        max: options.maxInterval ?? 30000
      },
      name: 'twarga-lab:model',
      standby: options.standby ?? 'when-hidden'
    });
    this._poll.ticked.connect(this._onTick, this);
  }

  /** Emitted after every poll that changed something, and after each action. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Who I am, my credits, quota and usage; null until the first answer. */
  get me(): IMe | null {
    return this._me;
  }

  /** My VMs, as of the last answer. */
  get vms(): readonly IVM[] {
    return this._vms;
  }

  /** My labs (destroyed ones left out), as of the last answer. */
  get labs(): readonly ILab[] {
    return this._labs;
  }

  /** The lab `id`, or null. */
  labOf(id: number | null | undefined): ILab | null {
    return id === null || id === undefined
      ? null
      : (this._labs.find(lab => lab.id === id) ?? null);
  }

  /** The images a VM can be created from. */
  get images(): readonly IImage[] {
    return this._images;
  }

  /** Why the service cannot be used right now, or null when it answers. */
  get serviceError(): string | null {
    return this._serviceError;
  }

  /** Whether the service has answered at least once. */
  get loaded(): boolean {
    return this._me !== null;
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Poll now and resolve after the answer has been applied. */
  async refresh(): Promise<void> {
    if (this.isDisposed) {
      return;
    }
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Create a VM; rejects with a `TwargaAPIError` (with `field` for a bad value). */
  async createVM(request: ICreateVM): Promise<IVM> {
    const vm = await requestAPI<IVM>('vms', jsonBody('POST', request));
    this._upsert(vm);
    void this.refresh();
    return vm;
  }

  /** Start, stop, restart, force-stop or destroy a VM. */
  async act(id: number, action: VMAction): Promise<IVM> {
    const vm = await requestAPI<IVM>(
      `vms/${encodeURIComponent(String(id))}/action`,
      jsonBody('POST', { action })
    );
    this._upsert(vm);
    void this.refresh();
    return vm;
  }

  /** The lab templates a lab can be made from; rejects with a `TwargaAPIError`. */
  async labTemplates(): Promise<ILabTemplate[]> {
    return requestAPI<ILabTemplate[]>('lab-templates');
  }

  /** Make a lab from a template (all its VMs and networks, or nothing). */
  async createLab(request: ICreateLab): Promise<ILab> {
    const lab = await requestAPI<ILab>('labs', jsonBody('POST', request));
    this._upsertLab(lab);
    void this.refresh();
    return lab;
  }

  /** Start, stop or destroy a whole lab. */
  async actOnLab(id: number, action: LabAction): Promise<ILab | null> {
    const lab = await requestAPI<ILab | null>(
      `labs/${encodeURIComponent(String(id))}/action`,
      jsonBody('POST', { action })
    );
    if (lab && typeof lab === 'object' && 'status' in lab) {
      this._upsertLab(lab);
    } else if (action === 'destroy') {
      this._labs = this._labs.filter(item => item.id !== id);
      this._changed.emit();
    }
    void this.refresh();
    return lab ?? null;
  }

  /** Destroy a VM and its disks. */
  async destroyVM(id: number): Promise<void> {
    await requestAPI<void>(`vms/${encodeURIComponent(String(id))}`, {
      method: 'DELETE'
    });
    void this.refresh();
  }

  /** The VM whose snapshots each poll also fetches, or null. */
  get watchedVM(): number | null {
    return this._watched;
  }

  /**
   * Poll the snapshots of VM `id` too (null: of no VM) and fetch them now. Resolves
   * when they are loaded; a failure to list them is kept in `snapshotError`.
   */
  async watchSnapshots(id: number | null): Promise<void> {
    if (id === this._watched) {
      return;
    }
    this._watched = id;
    this._changed.emit();
    if (id !== null && !this.isDisposed) {
      await this.loadSnapshots(id).catch(() => undefined);
    }
  }

  /** VM `id`'s snapshots, oldest first, or null until they have been listed. */
  snapshotsOf(id: number): readonly IVMSnapshot[] | null {
    return this._snapshots.get(id) ?? null;
  }

  /** Why VM `id`'s snapshots could not be listed last time, or null. */
  snapshotError(id: number): string | null {
    return this._snapshotErrors.get(id) ?? null;
  }

  /** List VM `id`'s snapshots now; rejects with a `TwargaAPIError`. */
  async loadSnapshots(id: number): Promise<IVMSnapshot[]> {
    const version = this._bump(id);
    try {
      const snapshots = await requestAPI<IVMSnapshot[]>(Private.snapshots(id));
      this._setSnapshots(id, version, snapshots, null);
      return snapshots;
    } catch (error) {
      this._setSnapshots(id, version, null, Private.messageOf(error));
      throw error;
    }
  }

  /** Take snapshot `name` of VM `id`; rejects with a `TwargaAPIError`. */
  async takeSnapshot(id: number, name: string): Promise<IVMSnapshot> {
    const snapshot = await requestAPI<IVMSnapshot>(
      Private.snapshots(id),
      jsonBody('POST', { name })
    );
    const known = (this._snapshots.get(id) ?? []).filter(
      item => item.name !== snapshot.name
    );
    this._setSnapshots(id, this._bump(id), [...known, snapshot], null);
    void this.loadSnapshots(id).catch(() => undefined);
    return snapshot;
  }

  /** Revert VM `id` to snapshot `name`; resolves with the VM as it is afterwards. */
  async revertSnapshot(id: number, name: string): Promise<IVM> {
    const vm = await requestAPI<IVM>(
      Private.snapshot(id, name),
      jsonBody('POST', { action: 'revert' })
    );
    this._upsert(vm);
    void this.refresh();
    return vm;
  }

  /** Delete snapshot `name` of VM `id`. */
  async deleteSnapshot(id: number, name: string): Promise<void> {
    await requestAPI<void>(Private.snapshot(id, name), { method: 'DELETE' });
    const known = this._snapshots.get(id);
    if (known) {
      const left = known.filter(item => item.name !== name);
      this._setSnapshots(id, this._bump(id), left, null);
    }
    void this.loadSnapshots(id).catch(() => undefined);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _fetch(): Promise<IPollAnswer> {
    const wantImages = this._images.length === 0;
    const watched = this._watched;
    const [me, vms, images, labs, snapshots] = await Promise.all([
      requestAPI<IMe>('me'),
      requestAPI<IVM[]>('vms'),
      // A missing image list must not hide the VMs: it is fetched again next time.
      wantImages
        ? requestAPI<IImage[]>('images').catch(() => null)
        : Promise.resolve(null),
      // Nor may the labs (a service from before them answers 404): VMs show ungrouped.
      requestAPI<ILab[]>('labs').catch(() => null),
      // Nor may the watched VM's snapshots: their failure is shown with them.
      watched === null ? Promise.resolve(null) : this._fetchSnapshots(watched)
    ]);
    return { me, vms, images, labs, snapshots };
  }

  private async _fetchSnapshots(vmId: number): Promise<ISnapshotAnswer> {
    const version = this._versions.get(vmId) ?? 0;
    try {
      const snapshots = await requestAPI<IVMSnapshot[]>(
        Private.snapshots(vmId)
      );
      return { vmId, version, snapshots, error: null };
    } catch (error) {
      return {
        vmId,
        version,
        snapshots: null,
        error: Private.messageOf(error)
      };
    }
  }

  /** A new version of VM `id`'s snapshot list: answers to older requests lose. */
  private _bump(id: number): number {
    const version = (this._versions.get(id) ?? 0) + 1;
    this._versions.set(id, version);
    return version;
  }

  /** Apply a list (or why it failed) unless something newer came meanwhile. */
  private _setSnapshots(
    id: number,
    version: number,
    snapshots: IVMSnapshot[] | null,
    error: string | null
  ): boolean {
    if ((this._versions.get(id) ?? 0) !== version) {
      return false;
    }
    if (snapshots) {
      this._snapshots.set(id, snapshots);
      this._snapshotErrors.delete(id);
    } else {
      this._snapshotErrors.set(id, error);
    }
    this._changed.emit();
    return true;
  }

  private _onTick(poll: Poll<IPollAnswer, unknown>): void {
    const { phase, payload } = poll.state;
    // The first answer after a failure comes as 'reconnected': show it at once.
    if ((phase === 'resolved' || phase === 'reconnected') && payload) {
      const answer = payload as IPollAnswer;
      this._me = answer.me;
      this._vms = answer.vms;
      if (answer.images) {
        this._images = answer.images;
      }
      if (answer.labs) {
        this._labs = Private.liveLabs(answer.labs);
      }
      this._serviceError = null;
      const listed = answer.snapshots;
      if (listed) {
        const { vmId, version, snapshots, error } = listed;
        // Emits `changed` itself when applied.
        if (this._setSnapshots(vmId, version, snapshots, error)) {
          return;
        }
      }
      this._changed.emit();
    } else if (phase === 'rejected') {
      this._serviceError = Private.describeOutage(payload);
      this._changed.emit();
    }
  }

  private _upsert(vm: IVM): void {
    const index = this._vms.findIndex(item => item.id === vm.id);
    this._vms =
      index === -1
        ? [...this._vms, vm]
        : [...this._vms.slice(0, index), vm, ...this._vms.slice(index + 1)];
    this._changed.emit();
  }

  private _upsertLab(lab: ILab): void {
    const index = this._labs.findIndex(item => item.id === lab.id);
    const labs =
      index === -1
        ? [...this._labs, lab]
        : [...this._labs.slice(0, index), lab, ...this._labs.slice(index + 1)];
    this._labs = Private.liveLabs(labs);
    this._changed.emit();
  }

  private _poll: Poll<IPollAnswer, unknown>;
  private _changed = new Signal<this, void>(this);
  private _me: IMe | null = null;
  private _vms: IVM[] = [];
  private _images: IImage[] = [];
  private _labs: ILab[] = [];
  private _serviceError: string | null = null;
  private _watched: number | null = null;
  private _snapshots = new Map<number, IVMSnapshot[]>();
  private _snapshotErrors = new Map<number, string | null>();
  private _versions = new Map<number, number>();
}

export namespace TwargaModel {
  export interface IOptions {
    /** Milliseconds between polls while the service answers (default 3000). */
    interval?: number;
    /**
     * Longest wait between polls while backing off after failures (default 30000).
     * Lumino's `Poll` raises anything shorter to 30000.
     */
    maxInterval?: number;
    /** When to stop polling (default: while the page is hidden). */
    standby?: Poll.Standby | (() => boolean | Poll.Standby);
  }
}

namespace Private {
  /** The labs that still exist. */
  export function liveLabs(labs: ILab[]): ILab[] {
    return labs.filter(lab => lab.status !== 'destroyed');
  }
  /** The API path of a VM's snapshots. */
  export function snapshots(vmId: number): string {
    return `vms/${encodeURIComponent(String(vmId))}/snapshots`;
  }

  /** The API path of one snapshot. */
  export function snapshot(vmId: number, name: string): string {
    return `${snapshots(vmId)}/${encodeURIComponent(name)}`;
  }

  export function messageOf(error: unknown): string {
    return error instanceof Error ? error.message : String(error);
  }

  /** A sentence for the panel when a poll failed. */
  export function describeOutage(error: unknown): string {
    if (error instanceof TwargaAPIError) {
      if (error.status === 0) {
        return 'Twarga Lab cannot be reached: the Jupyter server is not answering.';
      }
      if (error.status === 404) {
        return 'Twarga Lab is not running on this Jupyter server.';
      }
      if (error.status === 401 || error.status === 403) {
        return `You are not signed in to Twarga Lab (${error.message}).`;
      }
      if (error.serviceDown) {
        return `Twarga Lab is unavailable: ${error.message.replace(/\.$/, '')}.`;
      }
      return `Twarga Lab answered with an error: ${error.message.replace(/\.$/, '')}.`;
    }
    return `Twarga Lab cannot be reached: ${String(error)}.`;
  }
}
