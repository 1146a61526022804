import { LabIcon } from '@jupyterlab/ui-components';

/** The Twarga Lab cloud, for the side panel, the launcher and the palette. */
export const twargaIcon = new LabIcon({
  name: 'twarga-lab:cloud',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16" height="16">' +
    '<path class="jp-icon3" fill="#616161" d="M19.35 10.04A7.49 7.49 0 0 0 12 4C9.11 4 ' +
    '6.6 5.64 5.35 8.04A5.994 5.994 0 0 0 0 14c0 3.31 2.69 6 6 6h13c2.76 0 5-2.24 5-5 ' +
    '0-2.64-2.05-4.78-4.65-4.96zM8 17H6v-5h2v5zm3.5 0h-2V9h2v8zm3.5 0h-2v-3h2v3z"/></svg>'
});
