import { IWidgetTracker } from '@jupyterlab/apputils';
import { Token } from '@lumino/coreutils';

import { ConsoleTab } from './consoletab';
import { TwargaModel } from './model';

/** The commands this extension adds. */
export namespace CommandIDs {
  export const openPanel = 'twarga:open-panel';
  /** Args `{id, name?}`: the console of one of my VMs. */
  export const openConsole = 'twarga:open-console';
  /** Args `{path, label?}`: any terminado websocket under the server's ws URL. */
  export const openTerminado = 'twarga:open-terminado';
  /** Args `{path, label?, caption?}`: a notebook under the Jupyter root. */
  export const openNotebook = 'twarga:open-notebook';
  /** The "New lab" dialog: a lab made from a template (`POST twarga/api/labs`). */
  export const newLab = 'twarga:new-lab';
}

/** The one `TwargaModel` of the page, shared by the panel and the status bar. */
export const ITwargaModel = new Token<TwargaModel>(
  'twarga-lab:ITwargaModel',
  'The Twarga Lab state of this page: me, my VMs and the images, polled.'
);

/** The open console tabs: VM consoles and terminado consoles. */
export interface ITwargaConsoles {
  /** VM console tabs, restored by VM id after a reload. */
  readonly vms: IWidgetTracker<ConsoleTab>;
  /** Terminado console tabs, restored by websocket path after a reload. */
  readonly terminado: IWidgetTracker<ConsoleTab>;
}

/** The console tabs of the page. */
export const ITwargaConsoles = new Token<ITwargaConsoles>(
  'twarga-lab:ITwargaConsoles',
  'The Twarga Lab console tabs of this page.'
);
