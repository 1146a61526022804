import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { jsonBody, requestAPI, TwargaAPIError } from './handler';
import { ICreateVM, IImage, IMe, IVM, VMAction } from './types';

/** What one poll brings back. */
interface ISnapshot {
  me: IMe;
  vms: IVM[];
  images: IImage[] | null;
}

/**
 * The one owner of Twarga state in the browser: polls `me` and `vms` (and `images`
 * until it has them), emits `changed`, and performs the user's actions.
 *
 * Views (side panel, status bar) only render it; they never call the API themselves.
 */
export class TwargaModel implements IDisposable {
  constructor(options: TwargaModel.IOptions = {}) {
    this._poll = new Poll<ISnapshot, unknown>({
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

  /** Destroy a VM and its disks. */
  async destroyVM(id: number): Promise<void> {
    await requestAPI<void>(`vms/${encodeURIComponent(String(id))}`, {
      method: 'DELETE'
    });
    void this.refresh();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _fetch(): Promise<ISnapshot> {
    const wantImages = this._images.length === 0;
    const [me, vms, images] = await Promise.all([
      requestAPI<IMe>('me'),
      requestAPI<IVM[]>('vms'),
      // A missing image list must not hide the VMs: it is fetched again next time.
      wantImages
        ? requestAPI<IImage[]>('images').catch(() => null)
        : Promise.resolve(null)
    ]);
    return { me, vms, images };
  }

  private _onTick(poll: Poll<ISnapshot, unknown>): void {
    const { phase, payload } = poll.state;
    // The first answer after a failure comes as 'reconnected': show it at once.
    if ((phase === 'resolved' || phase === 'reconnected') && payload) {
      const snapshot = payload as ISnapshot;
      this._me = snapshot.me;
      this._vms = snapshot.vms;
      if (snapshot.images) {
        this._images = snapshot.images;
      }
      this._serviceError = null;
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

  private _poll: Poll<ISnapshot, unknown>;
  private _changed = new Signal<this, void>(this);
  private _me: IMe | null = null;
  private _vms: IVM[] = [];
  private _images: IImage[] = [];
  private _serviceError: string | null = null;
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
